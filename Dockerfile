# syntax=docker/dockerfile:1.7
#
# Three images from one source tree, one target each:
#   docker build --target operator -t diffusion-operator:dev .
#   docker build --target runtime  -t diffusion-runtime:dev  .
#   docker build --target queue    -t diffusion-queue:dev    .
# (`diffusion-dev images` builds them with buildah on a local Debian base: PYTHON_IMAGE below.)
# `queue` is Debian's redis-server for the chart's optional queue server (queue.enabled): the
# distribution's package, no Python project in it.
#
# Versions come from pyproject.toml only: each image installs the project with its extra
# (`[operator]`, `[runtime]`), so the pins live in one place. The operator image never installs
# torch. Both images run as uid/gid 1000 (numeric, so `runAsNonRoot` can verify it).
#
# Layers: the dependencies are installed from pyproject.toml alone (empty package folders and
# README), then the sources are copied and installed without dependencies, so a source or README
# change rebuilds only a small layer and never downloads or unpacks torch again. pip's wheel cache is a build cache
# mount, not part of any layer.
#
# No nvidia/cuda base: torch's PyPI wheels bring their own CUDA user-space libraries (the
# nvidia-* wheels), and the NVIDIA container toolkit injects the driver libraries into any image
# when NVIDIA_VISIBLE_DEVICES is set (the device plugin sets it per container; the ENV below is the
# default the CUDA images also carry). A CUDA runtime base would only add a second copy of them.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------- shared base: user, Python env
FROM ${PYTHON_IMAGE} AS python-base
RUN groupadd --gid 1000 diffusion \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/diffusion --shell /usr/sbin/nologin diffusion
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
COPY pyproject.toml /src/

# ---------------------------------------------------------------- operator: no torch
FROM python-base AS operator-deps
RUN --mount=type=cache,id=pip,target=/root/.cache/pip,sharing=locked \
    mkdir -p /src/operator /src/runtime \
    && touch /src/README.md \
    && python3 -m venv /opt/venv \
    && pip install "/src/[operator]"

FROM operator-deps AS operator
LABEL org.opencontainers.image.title="diffusion-operator" \
      org.opencontainers.image.description="Kubernetes operator (kopf) for DiffusionDeployment resources"
COPY README.md /src/
COPY operator/ /src/operator/
COPY runtime/ /src/runtime/
RUN pip install --no-cache-dir --no-deps --force-reinstall /src \
    && rm -rf /src
ENV HOME=/tmp
USER 1000:1000
# 8080: kopf liveness (/healthz), 9090: operator metrics
EXPOSE 8080 9090
ENTRYPOINT ["diffusion-operator", "run"]

# ---------------------------------------------------------------- runtime: torch from PyPI
FROM python-base AS runtime-deps
RUN --mount=type=cache,id=pip,target=/root/.cache/pip,sharing=locked \
    mkdir -p /src/operator /src/runtime \
    && touch /src/README.md \
    && python3 -m venv /opt/venv \
    && pip install "/src/[runtime]"

FROM runtime-deps AS runtime
LABEL org.opencontainers.image.title="diffusion-runtime" \
      org.opencontainers.image.description="diffusers + cache-dit + torchao image server (OpenAI images API)"
# `compile: true` needs a C/C++ compiler and Python's headers at run time: inductor builds its CPU
# kernels and their wrappers with g++ (without them the warmup fails with InvalidCxxCompiler or
# CppCompileError) and Triton its GPU launcher with gcc. python:*-slim ships Python.h; a Debian
# python3 base needs python3-dev. The base image's Debian release decides the versions.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && { test -n "$(find /usr/include /usr/local/include -path '*/python3*/Python.h' -print -quit 2>/dev/null)" \
         || apt-get install -y --no-install-recommends python3-dev; } \
    && rm -rf /var/lib/apt/lists/*
COPY README.md /src/
COPY operator/ /src/operator/
COPY runtime/ /src/runtime/
RUN pip install --no-cache-dir --no-deps --force-reinstall /src \
    && rm -rf /src
ENV HOME=/home/diffusion \
    HF_HOME=/home/diffusion/.cache/huggingface \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 1000:1000
WORKDIR /home/diffusion
# 8000: API, /health, /ready, /metrics; 9090: metrics only
EXPOSE 8000 9090
ENTRYPOINT ["diffusion-runtime"]
CMD ["serve", "--config", "/etc/diffusion/runtime.yaml"]

# ---------------------------------------------------------------- queue: Debian's redis-server
# The shared work queue's server (Redis Streams) for the chart's `queue.enabled`. The package comes
# from the base image's Debian release (bookworm: Redis 7, which KEDA's lagCount trigger needs). The
# chart starts it with its own arguments (password from a Secret, data on the claim at /data).
FROM python-base AS queue
LABEL org.opencontainers.image.title="diffusion-queue" \
      org.opencontainers.image.description="Redis (Debian's redis-server) for the diffusion-operator work queue"
# policy-rc.d: the package's postinst must not start a server inside the build
# hadolint ignore=DL3008
RUN printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d \
    && apt-get update \
    && apt-get install -y --no-install-recommends redis-server redis-tools \
    && rm -rf /var/lib/apt/lists/* /usr/sbin/policy-rc.d \
    && mkdir -p /data && chown 1000:1000 /data
USER 1000:1000
WORKDIR /data
EXPOSE 6379
ENTRYPOINT ["redis-server"]
