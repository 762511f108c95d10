# syntax=docker/dockerfile:1
# The operator image: python -m pgw_operator (kopf), the project installed with
# its `operator` extra from uv.lock, without Prefect: the operator talks to
# Prefect over HTTP (httpx) and imports only the core's stdlib-only modules.
# No Prefect, no torch, no uv, no compiler in the result.
#
#   docker build -f docker/operator.Dockerfile -t REGISTRY/prefect-gpu-workers-operator:0.1.0 .
#
# Build context: the repository root; docker/operator.Dockerfile.dockerignore
# lets only the project sources and the lock file in.
ARG PYTHON_VERSION=3.11
# The base of both stages: any image whose python3 is Python ${PYTHON_VERSION} with
# its venv module. The tests build both images on a Debian base made here
# (hack/build-images), since no registry is reachable there.
ARG BASE_IMAGE=python:${PYTHON_VERSION}-slim

FROM ${BASE_IMAGE} AS build
# uv at the version hack/setup pins, from PyPI like there.
ARG UV_VERSION=0.13.9
# pip and uv trust the system's CA store (build stage only), so a build behind a
# TLS-inspecting proxy works with its CA bundle mounted over that file.
ENV VIRTUAL_ENV=/opt/venv \
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
# Dependencies first (cached until uv.lock changes), then the project itself.
# `--prune prefect` drops Prefect and every package that only Prefect needs
# from the locked set; the hashes in the export are checked on install and
# --no-deps keeps pip from resolving anything the lock did not list.
COPY pyproject.toml uv.lock ./
RUN uv export --frozen --no-default-groups --extra operator --no-emit-project --prune prefect --output-file /tmp/requirements.txt \
 && uv venv /opt/venv \
 && uv pip install --require-hashes --no-deps -r /tmp/requirements.txt
COPY README.md ./
COPY src ./src
COPY operator ./operator
COPY flows ./flows
RUN uv pip install --no-deps .

FROM ${BASE_IMAGE}
# Non-root, numeric uid (runAsNonRoot can verify it), >= 10000 so that it is no user of
# the node's own; the chart runs it as 10001.
RUN groupadd --gid 10001 pgw-operator \
 && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin pgw-operator
COPY --from=build /opt/venv /opt/venv
# The root filesystem is read-only in the chart; /tmp is an emptyDir there.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_HOME=/tmp/prefect
USER 10001:10001
# kopf's liveness endpoint (/healthz) and, with --metrics, Prometheus metrics.
EXPOSE 8080 9090
ENTRYPOINT ["python", "-m", "pgw_operator"]
CMD ["--liveness", "http://0.0.0.0:8080/healthz"]
