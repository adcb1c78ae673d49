# FaceAdapt service image: the API (`faceadapt serve`) and the Celery workers run from the same image.
# PyPI's torch wheels carry CUDA, so the worker uses the GPU when the container gets one (compose: deploy.resources).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    FACEADAPT_HOME=/data
RUN apt-get update \
 && apt-get install -y --no-install-recommends libglib2.0-0 libgomp1 curl \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /srv/faceadapt
COPY pyproject.toml README.md ./
COPY restoration ./restoration
COPY service ./service
COPY app ./app
COPY worker ./worker
COPY cli ./cli
COPY alembic ./alembic
COPY alembic.ini ./
# same install as the Makefile: facexlib / facenet-pytorch pin old torch releases, their real needs are in pyproject
# editable: the alembic migrations (alembic/, alembic.ini) stay beside the packages, where `alembic upgrade head` finds them
RUN pip install -e . \
 && pip install --no-deps 'facexlib==0.3.0' 'facenet-pytorch==2.6.0'

# every path compose mounts a named volume on exists in the image, owned by the user the containers run as: a new
# named volume is initialised from the image's folder (its owner included), so uid 10001 can write to it
RUN useradd --create-home --uid 10001 faceadapt \
 && mkdir -p /data /data/models /data/facexlib /work \
 && chown -R faceadapt:faceadapt /data /work
USER faceadapt
VOLUME ["/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["faceadapt", "serve", "--host", "0.0.0.0", "--port", "8000", "--no-worker"]
