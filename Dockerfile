# One image for the API (`flava serve`) and the worker (`flava worker`).
#
#   docker build -t flava-stream .                       # PyPI torch: CUDA-capable on x86_64
#   docker build --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu -t flava-stream:cpu .
#
# The worker picks the GPU when one is visible (FLAVA_DEVICE=auto) and the CPU otherwise.
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
# empty: PyPI (its Linux x86_64 torch wheels bundle CUDA); or a PyTorch wheel index
ARG TORCH_INDEX_URL=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, in its own layer: it is most of the image and changes least often
RUN pip install "torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# the project (PyAV wheels bundle FFmpeg, so no system codecs are needed)
COPY pyproject.toml README.md ./
COPY contract ./contract
COPY service ./service
COPY worker ./worker
COPY flava ./flava
RUN pip install .

# non-root; checkpoints, uploads, kept inputs, models and indexes live on volumes mounted
# under /var/lib/flava (a new named volume takes these directories' owner)
RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin flava \
    && mkdir -p /var/lib/flava/checkpoints /var/lib/flava/blobs /var/lib/flava/inputs \
                /var/lib/flava/models /var/lib/flava/index \
    && chown -R flava:flava /var/lib/flava
USER flava
# production unless told otherwise: `flava serve` refuses to start without FLAVA_API_TOKEN.
# Local use without a token: -e FLAVA_ENVIRONMENT=dev, published on 127.0.0.1 only (README)
ENV FLAVA_CHECKPOINT_DIR=/var/lib/flava/checkpoints \
    FLAVA_ENVIRONMENT=production

EXPOSE 8000 9100
ENTRYPOINT ["flava"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
