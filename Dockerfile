# syntax=docker/dockerfile:1.7
#
# Two images from one source tree, one target each:
#   docker build --target operator -t diffusion-operator:dev .
#   docker build --target runtime  -t diffusion-runtime:dev  .
#
# Versions come from pyproject.toml only: each image installs the project with its extra
# (`./[operator]`, `./[runtime]`), so the pins live in one place. The operator image never
# installs torch. Both images run as uid/gid 1000 (numeric, so `runAsNonRoot` can verify it).
#
# The torch wheel from PyPI bundles its own CUDA user-space libraries; the nvidia/cuda base image
# supplies the NVIDIA container-runtime conventions (NVIDIA_* env) and a matching libc. Override
# CUDA_IMAGE to follow your node driver (e.g. --build-arg CUDA_IMAGE=nvidia/cuda:<tag>).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04

# ---------------------------------------------------------------- source (shared by both builds)
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY runtime/ runtime/

# ---------------------------------------------------------------- operator: slim Python, no torch
FROM ${PYTHON_IMAGE} AS operator-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
COPY --from=source /src /src
WORKDIR /src
RUN pip install --no-cache-dir "./[operator]"

FROM ${PYTHON_IMAGE} AS operator
LABEL org.opencontainers.image.title="diffusion-operator" \
      org.opencontainers.image.description="Kubernetes operator (kopf) for DiffusionDeployment resources"
RUN groupadd --gid 1000 diffusion \
    && useradd --uid 1000 --gid 1000 --no-create-home --home-dir /tmp --shell /usr/sbin/nologin diffusion
COPY --from=operator-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/tmp
USER 1000:1000
# 8080: kopf liveness (/healthz), 9090: operator metrics
EXPOSE 8080 9090
ENTRYPOINT ["diffusion-operator", "run"]

# ---------------------------------------------------------------- runtime: CUDA base with torch
FROM ${CUDA_IMAGE} AS runtime-base
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

FROM runtime-base AS runtime-build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH}
COPY --from=source /src /src
WORKDIR /src
RUN pip install --no-cache-dir "./[runtime]"

FROM runtime-base AS runtime
LABEL org.opencontainers.image.title="diffusion-runtime" \
      org.opencontainers.image.description="diffusers + cache-dit + torchao image server (OpenAI images API)"
# Ubuntu images ship a user `ubuntu` with uid 1000: replace it by ours.
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && (groupdel ubuntu 2>/dev/null || true) \
    && groupadd --gid 1000 diffusion \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/diffusion --shell /usr/sbin/nologin diffusion
COPY --from=runtime-build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HOME=/home/diffusion \
    HF_HOME=/home/diffusion/.cache/huggingface
USER 1000:1000
WORKDIR /home/diffusion
# 8000: API, /health, /ready, /metrics; 9090: metrics only
EXPOSE 8000 9090
ENTRYPOINT ["diffusion-runtime"]
CMD ["serve", "--config", "/etc/diffusion/runtime.yaml"]
