# rankline pipeline image: python -m pipeline.run inside, exports to /work/artifacts/run/export.
#   docker build -f docker/pipeline.Dockerfile -t rankline/pipeline:0.1.0 .      (from the repository root)
#   docker run --rm -v "$PWD/artifacts:/work/artifacts" rankline/pipeline:0.1.0 --work-dir /work/artifacts/run
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    RANKLINE_VENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

WORKDIR /app

# Dependencies first (a layer that survives source edits), installed exactly as scripts/setup.sh does.
COPY requirements.txt requirements-dev.txt requirements.lock ./
RUN python -m venv /opt/venv \
    && /opt/venv/bin/python -m pip install --upgrade pip \
    && /opt/venv/bin/python -m pip install -r requirements.txt -c requirements.lock

# The project; scripts/setup.sh then installs it (editable) into the same environment and stamps it.
COPY . .
RUN PYTHON=/usr/local/bin/python3.11 bash scripts/setup.sh \
    && useradd --create-home --uid 10001 rankline \
    && mkdir -p /work/artifacts && chown -R rankline /work

USER rankline
WORKDIR /work
ENV PYTHONPATH=/app
ENTRYPOINT ["python", "-m", "pipeline.run"]
