# syntax=docker/dockerfile:1
# valve-id: one image for the backend (`valve-id serve`) and the RQ workers (`valve-id worker`).
#
#   docker build -t valve-id:local .                       (docker-compose.yml does this)
#   docker build --build-arg IMAGENET_WEIGHTS=skip ...     (build host without internet)
#
# Size: torch==2.14.1 from PyPI is a CUDA build on x86_64 and pulls NVIDIA's CUDA, cuDNN and
# NCCL wheels, so the image is large: about 7 GB (the same packages take 6.5 GB in a virtualenv:
# 3.2 GB NVIDIA libraries, 1.2 GB torch, 0.9 GB triton). That one image runs on a CPU (backend,
# default-queue worker) and on a GPU (training worker): the host only needs the NVIDIA driver
# and the NVIDIA Container Toolkit; no CUDA base image is needed.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------------------------
# build: a virtualenv with valve-id and its dependencies, installed with pip.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src

# Dependencies first, from pyproject.toml alone (empty package folders), so a code change
# does not reinstall torch; the project itself follows without touching them.
COPY pyproject.toml README.md ./
RUN mkdir backend training \
    && pip install . \
    && pip uninstall --yes valve-id

# ImageNet weights for the paper's recipe. valve-id never downloads at run time (a missing
# file means random init and a warning), so fetch them here, hash-checked by torch.hub.
ARG IMAGENET_WEIGHTS=download
RUN mkdir -p /opt/torch/hub/checkpoints \
    && if [ "$IMAGENET_WEIGHTS" = download ]; then \
        TORCH_HOME=/opt/torch python -c "import torch.hub; from torchvision.models import ResNet34_Weights; torch.hub.load_state_dict_from_url(ResNet34_Weights.IMAGENET1K_V1.url, check_hash=True, progress=False)"; \
    elif [ "$IMAGENET_WEIGHTS" != skip ]; then \
        echo "IMAGENET_WEIGHTS must be download or skip" >&2; exit 1; \
    fi

COPY backend ./backend
COPY training ./training
RUN pip install --no-deps .

# ---------------------------------------------------------------------------------------------
# runtime: the venv, the label config, a non-root user; the backend by default.
FROM ${PYTHON_IMAGE} AS runtime
ARG VALVE_ID_UID=10001
RUN groupadd --system --gid "${VALVE_ID_UID}" valve-id \
    && useradd --system --uid "${VALVE_ID_UID}" --gid valve-id --create-home \
        --home-dir /home/valve-id --shell /usr/sbin/nologin valve-id

COPY --from=build /opt/venv /opt/venv
COPY --from=build /opt/torch /opt/torch
COPY label_config.xml /app/label_config.xml
# The reading guides' pictures, beside the config: every import installs them for its project.
COPY guides /app/guides

# Paths match docker-compose.yml's volumes. The installed package has no checkout around it,
# so the label config is named explicitly. NVIDIA_DRIVER_CAPABILITIES: CUDA compute on GPU
# hosts (ignored elsewhere); which GPU a container sees is set by its reservation.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    VALVE_ID_STATE_DIR=/var/lib/valve-id \
    MODEL_DIR=/var/lib/valve-id/models \
    VALVE_ID_CACHE_DIR=/var/lib/valve-id/cache \
    LOCAL_FILES_DOCUMENT_ROOT=/data/local-files \
    VALVE_ID_LABEL_CONFIG=/app/label_config.xml \
    TORCH_HOME=/opt/torch \
    MPLCONFIGDIR=/tmp/matplotlib \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

# Created here, owned by the app user: an empty named volume mounted on them takes this owner.
RUN mkdir -p /var/lib/valve-id/models /var/lib/valve-id/cache /data/local-files \
    && chown -R valve-id:valve-id /var/lib/valve-id /data/local-files

USER valve-id
WORKDIR /app
EXPOSE 9090
# /health needs no credentials even with BASIC_AUTH_* set. Workers override this check.
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=5)"]
CMD ["valve-id", "serve", "--host", "0.0.0.0", "--port", "9090"]

# ---------------------------------------------------------------------------------------------
# dashboard: rq-dashboard on valve-id's own rq, so it reads the jobs the workers write.
FROM runtime AS dashboard
USER root
RUN pip install --no-cache-dir rq-dashboard==0.9.0
USER valve-id
EXPOSE 9181
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import socket; socket.create_connection(('127.0.0.1', 9181), timeout=5).close()"]
CMD ["rq-dashboard", "--bind", "0.0.0.0", "--port", "9181"]

# ---------------------------------------------------------------------------------------------
# The default target (`docker build .` builds the last stage): the backend/worker image.
FROM runtime
