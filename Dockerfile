# ChargeGhar orchestrator image: API + embedded MQTT broker + Ray (head or worker).
# One image for every role in docker-compose.yaml; the role is chosen by the command.

# --- build stage: install the project and its dependencies into a virtualenv ---
FROM python:3.11-slim AS build

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

WORKDIR /src
COPY . .
RUN pip install --upgrade pip && pip install .

# --- runtime stage: only the virtualenv, run as a non-root user ---
FROM python:3.11-slim

ENV PATH="/opt/venv/bin:$PATH" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/data

# A fixed UID/GID so volume ownership is predictable. /data is created and owned here so a
# fresh named volume mounted on it inherits this ownership.
RUN groupadd --system --gid 10001 powerbank \
    && useradd --system --uid 10001 --gid powerbank --home-dir /home/powerbank --create-home powerbank \
    && mkdir -p /data \
    && chown powerbank:powerbank /data

COPY --from=build /opt/venv /opt/venv

USER powerbank
WORKDIR /home/powerbank

# 8010: HTTP API (HTTP_PORT), 1883: MQTT broker (MQTT_PORT).
EXPOSE 8010 1883

CMD ["powerbank", "up"]
