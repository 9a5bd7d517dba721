# The promptkd app (`python app.py`) on port 7860, run by the non-root user with uid 1000.
#
# GPU host (NVIDIA driver and the NVIDIA Container Toolkit):
#   docker build -t promptkd .
#   docker run --gpus all -p 7860:7860 -v promptkd-checkpoints:/home/user/app/checkpoints promptkd
# Machine without a GPU:
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t promptkd:cpu .
#   docker run -p 7860:7860 -v promptkd-checkpoints:/home/user/app/checkpoints promptkd:cpu
# docs/deployment.md describes the options; tests/test_deploy.py checks this file against the repository.

# The base image must provide Python 3.11 with pip. No CUDA base image is needed: the CUDA build of torch
# brings the CUDA libraries as pip packages, and the host driver is mounted by the NVIDIA runtime.
ARG BASE=python:3.11-slim
FROM ${BASE}

# Empty: torch 2.13.0 from PyPI, whose Linux x86_64 wheel is the CUDA 13.0 build (driver 580 or newer).
# Set it to a PyTorch index for another build, e.g. https://download.pytorch.org/whl/cpu for a CPU image.
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HOME=/home/user \
    PROMPTKD_HOME=/home/user/app/checkpoints \
    HF_HOME=/home/user/.cache/huggingface \
    HF_HUB_DISABLE_TELEMETRY=1 \
    GRADIO_ANALYTICS_ENABLED=False \
    GRADIO_SERVER_NAME=0.0.0.0 \
    GRADIO_SERVER_PORT=7860

RUN useradd --create-home --uid 1000 user
WORKDIR /home/user/app

# The dependencies are installed before the code is copied, so a code change reuses this layer.
COPY requirements.txt requirements-offline.txt ./
COPY scripts/install.sh scripts/install.sh
RUN TORCH_INDEX_URL="${TORCH_INDEX_URL}" bash scripts/install.sh

COPY . .
# The code stays owned by root. The user owns the working folder (Gradio may create .gradio/ there),
# the run folders and converted models (PROMPTKD_HOME) and the Hugging Face cache (HF_HOME).
RUN mkdir -p "${PROMPTKD_HOME}" "${HF_HOME}" \
 && chown 1000:1000 /home/user/app \
 && chown -R 1000:1000 "${PROMPTKD_HOME}" /home/user/.cache

USER 1000:1000
EXPOSE 7860
HEALTHCHECK --interval=30s --timeout=10s --start-period=120s \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('GRADIO_SERVER_PORT', '7860') + '/', timeout=5)"]
CMD ["python", "app.py"]
