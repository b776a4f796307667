# vramq: one image for the API, the scheduler and `vramq migrate`.
#   docker build -t vramq .                                  # CPU torch (API replicas, CPU-only hosts)
#   docker build -t vramq:cuda --build-arg TORCH_VARIANT=cu124 .   # CUDA torch (GPU scheduler hosts)
FROM python:3.11-slim

# cpu, or a CUDA variant of the PyTorch wheel index (cu121, cu124, cu126, ...).
ARG TORCH_VARIANT=cpu
ARG TORCH_SPEC="torch>=2.4"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, from the chosen index, so installing the project does not pull the multi-GB default wheel.
RUN pip install --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "${TORCH_SPEC}"

COPY pyproject.toml README.md alembic.ini ./
COPY core ./core
COPY db ./db
COPY workers ./workers
COPY scheduler ./scheduler
COPY api ./api
COPY vramq ./vramq
RUN pip install . \
    && useradd --create-home --uid 10001 --shell /usr/sbin/nologin vramq \
    && mkdir -p /data \
    && chown vramq:vramq /data

USER vramq
# /data holds uploads and outputs (and the embedded PostgreSQL when no VRAMQ_DATABASE_URL is set).
ENV VRAMQ_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

CMD ["vramq", "serve", "--host", "0.0.0.0"]
