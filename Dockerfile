# One image per role, from one Dockerfile:
#
#   docker build --build-arg ROLE=identity     -t converge-identity:0.1.0 .
#   docker build --build-arg ROLE=interactions -t converge-interactions:0.1.0 .
#   docker build --build-arg ROLE=scoring      -t converge-scoring:0.1.0 .
#   docker build --build-arg ROLE=recommendation -t converge-recommendation:0.1.0 .
#   docker build --build-arg ROLE=models       -t converge-models:0.1.0 .   # the training job
#   docker build --build-arg ROLE=tracking     -t converge-tracking:0.1.0 . # MLflow server (the chart runs `mlflow server`)
#
# ROLE picks the extra, so each image carries only what it runs: identity has
# no MLflow, scoring and models have LightGBM. The role's lock
# (requirements/<role>.lock, written by `make lock`) is installed before the
# sources are copied, so a change to the code rebuilds only the last layer.
# tests/deploy/test_dockerfile.py lints this file (no image builder runs on
# the development machines).

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ARG ROLE=identity
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never
RUN pip install --no-cache-dir "uv==0.13.9" \
    && python -m venv /opt/converge
WORKDIR /src
# Dependencies first: this layer changes only when the lock does.
COPY requirements/${ROLE}.lock /src/requirements/${ROLE}.lock
RUN uv pip install --no-cache --python /opt/converge/bin/python -r "requirements/${ROLE}.lock"
COPY pyproject.toml README.md LICENSE /src/
COPY services /src/services
COPY protos /src/protos
COPY models /src/models
RUN uv pip install --no-cache --python /opt/converge/bin/python --no-deps /src

FROM ${PYTHON_IMAGE} AS runtime
ARG ROLE=identity
LABEL org.opencontainers.image.title="converge-${ROLE}" \
      org.opencontainers.image.source="https://github.com/converge/converge" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric user, so Kubernetes' runAsNonRoot can check it.
RUN groupadd --system --gid 10001 converge \
    && useradd --system --uid 10001 --gid converge --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin converge
# LightGBM's wheel links the system's OpenMP runtime (libgomp.so.1), which
# the slim base leaves out: the roles that load LightGBM install it.
RUN if [ "${ROLE}" = scoring ] || [ "${ROLE}" = models ]; then \
      apt-get update \
      && apt-get install -y --no-install-recommends libgomp1=12.2.0-14+deb12u1 \
      && rm -rf /var/lib/apt/lists/*; \
    fi
COPY --from=build /opt/converge /opt/converge
# Bytecode was compiled at build time: the root filesystem can be read-only.
ENV PATH=/opt/converge/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CONVERGE_ROLE=${ROLE} \
    HOME=/tmp
WORKDIR /tmp
USER 10001:10001
# Liveness and readiness are the orchestrator's (native gRPC probes on
# grpc.health.v1); no HEALTHCHECK here.
# python -m converge.<role>: a service runs until SIGTERM; `models` is the
# `converge models` command (the chart passes `retrain --from-services`).
ENTRYPOINT ["/bin/sh", "-c", "exec python -m \"converge.${CONVERGE_ROLE}\" \"$@\"", "--"]
