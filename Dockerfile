# Image of qt running the main job: qt-serve with the default model on port 8000.
# For another base (e.g. a CUDA-enabled Python image): docker build --build-arg BASE=... .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}

# --build-arg PIP_EXTRA_INDEX_URL=<PyTorch CPU wheel index> gives a smaller CPU-only image (unset by default).
ARG PIP_EXTRA_INDEX_URL
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 QT_HOME=/data/qt
# g++: quant's native int4/int8 kernels are compiled for the CPU that runs them, at first use (~1 min),
# and cached under $QT_HOME/native.
RUN apt-get update && apt-get install -y --no-install-recommends g++=4:12.2.0-3 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md ./
COPY qt_serve ./qt_serve
COPY train ./train
COPY quant ./quant
COPY app ./app
COPY evals ./evals
RUN pip install --no-cache-dir . && useradd --create-home --uid 10001 qt && mkdir -p /data/qt && chown 10001 /data/qt
USER 10001
VOLUME ["/data/qt"]
EXPOSE 8000
# The container listens on all its interfaces so that `docker run -p` reaches it. Give it a key,
# `docker run -e QT_API_KEY=... -p 8000:8000 qt`: without one, anyone who reaches the port can use
# the models, and qt-serve says so in a warning at start-up.
CMD ["qt-serve", "--host", "0.0.0.0", "--port", "8000"]
