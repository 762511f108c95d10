# syntax=docker/dockerfile:1
# The worker image: Prefect, torch, the flows (pgw_flows) and the
# `prefect-gpu-workers` entrypoint, installed with the `worker` extra from
# uv.lock. The operator starts it as
#   prefect-gpu-workers worker --pool P --flow-runs N --limit-prefix X --wait-timeout S --with-healthcheck
# (waits for its limit, then execs `prefect worker start`), as uid 10001 with a
# read-only root filesystem, PREFECT_HOME=/var/run/prefect and /tmp as emptyDirs.
#
#   docker build -f docker/worker.Dockerfile -t REGISTRY/prefect-gpu-workers-worker:0.1.0 .
#
# Build context: the repository root; docker/worker.Dockerfile.dockerignore
# lets only the project sources and the lock file in.
ARG PYTHON_VERSION=3.11
# The base of both stages: any image whose python3 is Python ${PYTHON_VERSION} with
# its venv module. The tests build both images on a Debian base made here
# (hack/build-images), since no registry is reachable there.
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE} AS build
ARG UV_VERSION=0.13.9
# pip and uv trust the system's CA store (build stage only), so a build behind a
# TLS-inspecting proxy works with its CA bundle mounted over that file.
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1 \
    UV_NATIVE_TLS=1 \
    PIP_CERT=/etc/ssl/certs/ca-certificates.crt
# uv in a venv of its own, so the same step works where pip may not install into
# the system Python (PEP 668: a Debian python3); uv itself is one static binary.
RUN python3 -m venv /opt/uv \
 && /opt/uv/bin/pip install --no-cache-dir "uv==${UV_VERSION}" \
 && ln -s /opt/uv/bin/uv /usr/local/bin/uv
WORKDIR /src
COPY pyproject.toml uv.lock ./
# The worker extra (torch) by default; `--build-arg UV_EXTRAS=` leaves torch out
# (the tests' image: GPU steps simulated, about 2 GB less).
ARG UV_EXTRAS="--extra worker"
RUN uv sync --frozen --no-default-groups ${UV_EXTRAS} --no-install-project
COPY README.md ./
COPY src ./src
COPY operator ./operator
COPY flows ./flows
RUN uv sync --frozen --no-default-groups ${UV_EXTRAS} --no-editable

FROM ${BASE_IMAGE}
RUN groupadd --gid 10001 pgw-worker \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pgw-worker \
 && install -d -o 10001 -g 10001 /var/run/prefect
COPY --from=build /opt/venv /opt/venv
# Everything writable lives on the pod's emptyDirs (/var/run/prefect, /tmp).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_HOME=/var/run/prefect \
    XDG_CACHE_HOME=/tmp/.cache \
    TORCH_HOME=/tmp/.cache/torch \
    TRITON_CACHE_DIR=/tmp/.cache/triton \
    MPLCONFIGDIR=/tmp/.cache/matplotlib
USER 10001:10001
# The Prefect worker's health server (--with-healthcheck).
EXPOSE 8080
ENTRYPOINT ["prefect-gpu-workers"]
CMD ["--help"]
