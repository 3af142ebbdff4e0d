# syntax=docker/dockerfile:1
# One image for every notify process; the command chooses which one runs:
#   python gateway.py | user_service.py | template_service.py | email_worker.py | push_worker.py | inbox_worker.py
#   python -m common.data.migrate      (create and migrate the three databases, then exit)
#   python -m topology            (declare the RabbitMQ exchange and queues, then exit)
# Settings come from the environment at run time (see README "Settings"); none are baked in.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- build: install the pinned runtime requirements into a virtualenv --------------------------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
COPY requirements.txt /tmp/requirements.txt
RUN /opt/venv/bin/pip install --no-cache-dir -r /tmp/requirements.txt

# --- runtime: the virtualenv and the code, nothing else; runs as an unprivileged user ----------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="notify" \
      org.opencontainers.image.description="notify: gateway, user and template services, email and push workers" \
      org.opencontainers.image.licenses="UNLICENSED"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOST=0.0.0.0
RUN groupadd --system --gid 10001 notify \
    && useradd --system --uid 10001 --gid notify --home-dir /app --no-create-home \
       --shell /usr/sbin/nologin notify
WORKDIR /app
COPY --from=build /opt/venv /opt/venv
# Code is owned by root and read-only to the service user.
COPY common/ common/
COPY providers/ providers/
COPY topology/ topology/
COPY console/ console/
COPY migrations/ migrations/
COPY scripts/ scripts/
COPY *.py ./
RUN python -m compileall -q /app
USER 10001:10001
EXPOSE 8000 8001 8002 8003 8004 8005
# Asks /health/live on $PORT, or on the default port of the service in the command.
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-m", "scripts.healthcheck"]
CMD ["python", "gateway.py"]
