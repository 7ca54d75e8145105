# The demo stack's infrastructure from Debian packages: PostgreSQL, Redis and NGINX in one image
# (each container of deploy/stack.sh runs one of them). Built from the same Debian base as the
# Collab image, so the stack needs no registry:
#   podman build -f deploy/services.Dockerfile --build-arg BASE_IMAGE=... -t collab-services .
# In production use managed PostgreSQL and Redis, or your distribution's (docs/DEPLOY.md).
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}
# Debian's own packages of bookworm, updated with the base: the versions are the release's,
# not pinned here (DL3008), so security updates arrive with a rebuild.
# Debian's default site would listen on :80 of the host network: the stack's site replaces it.
# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       postgresql redis-server nginx-light gettext-base \
    && rm -rf /var/lib/apt/lists/* \
    && rm -f /etc/nginx/sites-enabled/default \
    && install -d -o postgres -g postgres -m 700 /var/lib/postgresql/data \
    && install -d -o redis -g redis -m 750 /var/lib/redis/data \
    && install -d -m 755 /var/www/acme /etc/collab/tls /etc/collab/nginx
ENV PATH=/usr/lib/postgresql/15/bin:$PATH
