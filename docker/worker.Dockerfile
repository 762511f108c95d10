# syntax=docker/dockerfile:1
# The worker image: Prefect, torch, the flows (pgw_flows) and the
# `prefect-gpu-workers` entrypoint, installed with the `worker` extra from
# uv.lock. The operator starts it as
#   prefect-gpu-workers worker --pool P --flow-runs N --limit-prefix X --wait-timeout S --with-healthcheck
# (waits for its limit, then execs `prefect worker start`), as uid 1000 with a
# read-only root filesystem, PREFECT_HOME=/var/run/prefect and /tmp as emptyDirs.
#
#   docker build -f docker/worker.Dockerfile -t REGISTRY/prefect-gpu-workers-worker:0.1.0 .
#
# Build context: the repository root; docker/worker.Dockerfile.dockerignore
# lets only the project sources and the lock file in.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS build
ARG UV_VERSION=0.13.9
RUN pip install --no-cache-dir "uv==${UV_VERSION}"
ENV UV_PROJECT_ENVIRONMENT=/opt/venv \
    UV_PYTHON_DOWNLOADS=never \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
WORKDIR /src
COPY pyproject.toml uv.lock ./
RUN uv sync --frozen --no-default-groups --extra worker --no-install-project
COPY README.md ./
COPY src ./src
COPY operator ./operator
COPY flows ./flows
RUN uv sync --frozen --no-default-groups --extra worker --no-editable

FROM python:${PYTHON_VERSION}-slim
RUN groupadd --gid 1000 worker \
 && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin worker \
 && install -d -o 1000 -g 1000 /var/run/prefect
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
USER 1000:1000
# The Prefect worker's health server (--with-healthcheck).
EXPOSE 8080
ENTRYPOINT ["prefect-gpu-workers"]
CMD ["--help"]
