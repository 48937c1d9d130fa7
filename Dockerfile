# edge-agent and edge-bridge in one small image.
#
#   docker build -t edge-agent .
#   docker build -t edge-agent --build-arg BASE_IMAGE=python:3.11-slim-bookworm .
#
# The same file builds for amd64, arm64 and armv7 (Raspberry Pi): nothing in it names an
# architecture; `docker buildx build --platform linux/arm64,linux/arm/v7 .` picks the
# base image of each platform. BASE_IMAGE must be a Debian-like image with Python >= 3.11,
# pip and venv (the official python:3.11-slim, or Debian bookworm with python3-pip).
#
# Run the agent (it needs the Docker socket; see docs/OPERATIONS.md):
#
#   docker run -d --name edge-agent --restart always \
#     --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -v /var/run/docker.sock:/var/run/docker.sock -v /srv/edge-agent:/app/data \
#     -e CONTAINER_IMAGE=registry.example.com/acme/app edge-agent
#
# The image runs as the unprivileged user 10001 (group 10001). The Docker socket belongs
# to root and the host's `docker` group, whose id differs from host to host: give the
# container that group with `--group-add <gid>` (compose: `group_add: ["<gid>"]`), where
# <gid> is `stat -c %g /var/run/docker.sock` on the host. DATA_DIR (/app/data) must be
# writable by uid 10001 (`chown -R 10001 /srv/edge-agent`).
#
# The bridge runs from the same image: `docker run ... edge-agent edge-bridge`.
#
# Offline builds: put the dependency wheels in ./wheelhouse and pass
# `--build-arg PIP_NO_INDEX=1 --build-arg PIP_FIND_LINKS=/src/wheelhouse`;
# PIP_INDEX_URL / PIP_EXTRA_INDEX_URL (e.g. https://www.piwheels.org/simple on armv7)
# are passed to pip the same way.

ARG BASE_IMAGE=python:3.11-slim

# ---------------------------------------------------------------------------- builder
# Builds the wheels and installs them into a virtual environment; only that venv is
# copied into the final image (no pip cache, no build tools, no sources).
FROM ${BASE_IMAGE} AS builder
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY . .
# `pip --python` installs into the venv with the base image's pip, so the venv itself
# carries no pip (about 10 MB less); the entry points' shebangs name /opt/edge-agent.
# [signing]: cryptography, for TRUSTED_KEYS (imported only when keys are set)
RUN python3 -m pip wheel --wheel-dir /wheels ".[signing]" \
    && python3 -m venv --without-pip /opt/edge-agent \
    && python3 -m pip --python /opt/edge-agent/bin/python install \
        --no-index --find-links /wheels "edge-agent[signing]" \
    && /opt/edge-agent/bin/edge-agent --version

# ------------------------------------------------------------------------------ final
FROM ${BASE_IMAGE}
ARG BASE_IMAGE
ARG VERSION=0.1.0
ARG REVISION=""
ARG CREATED=""
LABEL org.opencontainers.image.title="edge-agent" \
      org.opencontainers.image.description="Keeps one Docker container on a device at the image tag the fleet wants; includes the HTTP-to-MQTT bridge (edge-bridge)" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.documentation="docs/OPERATIONS.md" \
      org.opencontainers.image.base.name="${BASE_IMAGE}"

# --no-log-init: no sparse /var/log/lastlog entry for a high uid.
RUN useradd --no-log-init --uid 10001 --user-group --home-dir /app \
        --no-create-home --shell /usr/sbin/nologin edge \
    && mkdir -p /app/data \
    && chown 10001:10001 /app/data

COPY --from=builder /opt/edge-agent /opt/edge-agent

ENV PATH=/opt/edge-agent/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DATA_DIR=/app/data
WORKDIR /app
# Numeric, so that runtimes enforcing "run as non-root" can verify it.
USER 10001:10001

# Healthy while the agent's loop keeps publishing its state (DATA_DIR/status.json at
# least every TELEMETRY_INTERVAL); a stuck loop turns the container unhealthy.
# The bridge container overrides this (see docker-compose.yml).
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["edge-agent", "healthcheck"]

CMD ["edge-agent"]
