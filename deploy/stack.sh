#!/usr/bin/env bash
# The whole Collab deployment on one host, with podman: one command up, one down.
#
#   deploy/stack.sh up              build what is missing, start everything, get a certificate
#   deploy/stack.sh down [--volumes]  stop and remove the containers (--volumes: the data too)
#   deploy/stack.sh status          each container's state and health
#   deploy/stack.sh renew [--force] `certbot renew`; on a new certificate NGINX reloads
#   deploy/stack.sh rolling-restart restart the hub nodes one after the other, under traffic
#   deploy/stack.sh upgrade         rebuild the image, migrate, roll the hubs, then the worker
#   deploy/stack.sh logs NAME       one container's log (postgres, redis, hub1, worker, nginx...)
#
# The stack: PostgreSQL, Redis, `collab migrate` (once, before the hubs), two hub nodes, a Celery
# worker and NGINX with TLS, every container on the host network, every service but NGINX on
# loopback only. The certificate comes from an ACME server through NGINX's HTTP-01 path
# (certbot --webroot); without COLLAB_ACME_DIRECTORY a self-signed one stands in.
#
# Settings (environment variables; the defaults suit a local try):
#   COLLAB_DOMAIN            the site's name, in the certificate (localhost)
#   COLLAB_HTTP_PORT         NGINX's plain HTTP port: ACME challenges, redirects (8080; 80 for a
#                            real ACME server, which only ever validates on port 80)
#   COLLAB_HTTPS_PORT        NGINX's HTTPS port (8443; 443 in production)
#   COLLAB_ACME_DIRECTORY    the ACME directory URL, e.g. Let's Encrypt's
#                            https://acme-v02.api.letsencrypt.org/directory (unset: self-signed)
#   COLLAB_ACME_EMAIL        the ACME account's contact address (optional)
#   COLLAB_ACME_CA_BUNDLE    a CA bundle certbot trusts for the ACME server itself (a test CA)
#   COLLAB_HUB_PORTS         the hub nodes' loopback ports, one node each ("8001 8002")
#   COLLAB_POSTGRES_PORT     (5433) and COLLAB_REDIS_PORT (6380): loopback ports of the stack's
#                            own PostgreSQL and Redis, beside any the host runs already
#   COLLAB_WS_PER_ADDRESS    WebSockets one client address may hold open through NGINX (100)
#   COLLAB_STACK_NAME        the containers' name prefix (collab)
#   COLLAB_STACK_DIR         state: generated secrets, certificates, logs (deploy/.stack)
#   COLLAB_IMAGE, COLLAB_SERVICES_IMAGE, COLLAB_BASE_IMAGE   images used (and built when missing)
#   COLLAB_STACK_BUILD       "always" rebuilds the Collab image at `up` (default: when missing)
#   COLLAB_PODMAN            the podman command and its global flags
# Extra COLLAB_* settings for the hubs and the worker go in $COLLAB_STACK_DIR/extra.env.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
name="${COLLAB_STACK_NAME:-collab}"
state="${COLLAB_STACK_DIR:-$here/.stack}"
domain="${COLLAB_DOMAIN:-localhost}"
http_port="${COLLAB_HTTP_PORT:-8080}"
https_port="${COLLAB_HTTPS_PORT:-8443}"
read -r -a hub_ports <<<"${COLLAB_HUB_PORTS:-8001 8002}"
pg_port="${COLLAB_POSTGRES_PORT:-5433}"
redis_port="${COLLAB_REDIS_PORT:-6380}"
ws_per_address="${COLLAB_WS_PER_ADDRESS:-100}"
base_image="${COLLAB_BASE_IMAGE:-localhost/collab-base:bookworm}"
image="${COLLAB_IMAGE:-localhost/collab:latest}"
services_image="${COLLAB_SERVICES_IMAGE:-localhost/collab-services:bookworm}"
acme_directory="${COLLAB_ACME_DIRECTORY:-}"
# runc and cgroupfs: crun refuses hosts with hybrid cgroups, and these work everywhere.
read -r -a podman_cmd <<<"${COLLAB_PODMAN:-podman --runtime runc --cgroup-manager cgroupfs}"
# Explicit limits: some hosts cannot apply podman's defaults; a hub needs a descriptor per socket.
run_flags=(--network host --ulimit nofile=20000:20000 --ulimit nproc=4096:4096)
# Podman runs periodic health checks with systemd timers. Without systemd (a container host,
# CI) there are none: checks run when `up`, `rolling-restart` and `status` ask for them.
health_flags=() worker_health_interval=(--health-interval 60s)
if [ ! -d /run/systemd/system ]; then
  health_flags=(--health-interval disable) worker_health_interval=()
fi

log() { printf 'stack: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
podman_() { "${podman_cmd[@]}" "$@"; }
exists() { podman_ container exists "$1"; }

hubs() { local i; for i in "${!hub_ports[@]}"; do printf '%s-hub%d\n' "$name" $((i + 1)); done; }
containers() { printf '%s\n' "$name-nginx"; hubs; printf '%s\n' "$name-worker" "$name-redis" "$name-postgres"; }

# --- state ----------------------------------------------------------------------------------------

secrets() {
  # Generated once, at the first `up`, and kept in the state folder (never in the repository):
  # the server's signing key and the passwords of the stack's own PostgreSQL and Redis.
  mkdir -p "$state"
  chmod 700 "$state"
  if [ ! -s "$state/secrets.env" ]; then
    (
      umask 077
      {
        echo "SECRET_KEY=$(head -c 48 /dev/urandom | base64 | tr -d '/+=\n')"
        echo "POSTGRES_PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')"
        echo "REDIS_PASSWORD=$(head -c 24 /dev/urandom | base64 | tr -d '/+=\n')"
      } >"$state/secrets.env"
    )
    log "generated secrets in $state/secrets.env"
  fi
  # shellcheck disable=SC1091
  . "$state/secrets.env"
}

origin() {
  if [ "$https_port" = 443 ]; then echo "https://$domain"; else echo "https://$domain:$https_port"; fi
}

collab_env() {
  # What every Collab container reads (an env file: no secret on a command line or in `ps`).
  local redis="redis://:$REDIS_PASSWORD@127.0.0.1:$redis_port"
  touch "$state/collab.env"
  chmod 600 "$state/collab.env"
  cat >"$state/collab.env" <<EOF
COLLAB_ENV=production
COLLAB_SECRET_KEY=$SECRET_KEY
COLLAB_DATABASE_URL=postgresql+asyncpg://collab:$POSTGRES_PASSWORD@127.0.0.1:$pg_port/collab
COLLAB_BROKER_URL=$redis/0
COLLAB_CELERY_BROKER_URL=$redis/1
COLLAB_ALLOWED_ORIGINS=$(origin)
COLLAB_GUEST_ACCESS=true
COLLAB_WORKERS=1
COLLAB_FORWARDED_ALLOW_IPS=127.0.0.1
EOF
  touch "$state/extra.env"
}

# --- images ---------------------------------------------------------------------------------------

build() {  # image dockerfile
  log "building $1"
  podman_ build --format docker --network host "${run_flags[@]:2}" \
    --volume /etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro \
    --build-arg "BASE_IMAGE=$base_image" -f "$here/$2" -t "$1" "$repo" >"$state/build.log" 2>&1 \
    || { tail -n 30 "$state/build.log" >&2; die "building $1 failed (log: $state/build.log)"; }
}

images() {
  if ! podman_ image exists "$base_image"; then
    COLLAB_PODMAN="${podman_cmd[*]}" "$here/base-image.sh" "$base_image"
  fi
  if [ "${COLLAB_STACK_BUILD:-}" = always ] || ! podman_ image exists "$image"; then
    build "$image" Dockerfile
  fi
  podman_ image exists "$services_image" || build "$services_image" services.Dockerfile
}

# --- health ---------------------------------------------------------------------------------------

wait_healthy() {  # container seconds
  local deadline=$((SECONDS + $2))
  until podman_ healthcheck run "$1" >/dev/null 2>&1; do
    if [ "$(podman_ inspect -f '{{.State.Running}}' "$1" 2>/dev/null)" != true ]; then
      podman_ logs --tail 30 "$1" >&2 || true
      die "$1 stopped"
    fi
    [ $SECONDS -lt "$deadline" ] || { podman_ logs --tail 30 "$1" >&2; die "$1 is not healthy after $2 s"; }
    sleep 1
  done
  log "$1 is healthy"
}

# --- services -------------------------------------------------------------------------------------

start_postgres() {
  exists "$name-postgres" && return 0
  printf '%s\n' "$POSTGRES_PASSWORD" >"$state/postgres.password"
  chmod 644 "$state/postgres.password"  # read by the container's postgres user, once, at initdb
  # shellcheck disable=SC2016  # the script runs in the container: expanded there, not here
  podman_ run --detach --name "$name-postgres" "${run_flags[@]}" "${health_flags[@]}" --user postgres \
    --stop-signal SIGINT \
    --volume "$name-pgdata:/var/lib/postgresql/data" \
    --volume "$state/postgres.password:/run/collab/postgres.password:ro" \
    --health-cmd "pg_isready -q -h 127.0.0.1 -p $pg_port -U collab -d collab" \
    "$services_image" bash -c '
      set -e
      data=/var/lib/postgresql/data/pgdata
      if [ ! -s "$data/PG_VERSION" ]; then
        initdb -D "$data" -U collab --auth-local=trust --auth-host=scram-sha-256 --pwfile=/run/collab/postgres.password >/dev/null
        postgres -D "$data" -c listen_addresses= -k /tmp & pid=$!
        until pg_isready -q -h /tmp; do sleep 0.2; done
        createdb -h /tmp -U collab collab
        kill "$pid"; wait "$pid" || true
      fi
      exec postgres -D "$data" -c listen_addresses=127.0.0.1 -p '"$pg_port"' -k /tmp \
        -c max_connections=200' >/dev/null
}

start_redis() {
  exists "$name-redis" && return 0
  # The password in a file, not on the command line where `ps` shows it.
  printf 'port %s\nbind 127.0.0.1\nrequirepass %s\nappendonly yes\ndir /var/lib/redis/data\n' \
    "$redis_port" "$REDIS_PASSWORD" >"$state/redis.conf"
  chmod 644 "$state/redis.conf"
  podman_ run --detach --name "$name-redis" "${run_flags[@]}" "${health_flags[@]}" --user redis \
    --volume "$name-redisdata:/var/lib/redis/data" \
    --volume "$state/redis.conf:/etc/collab/redis.conf:ro" \
    --env "REDISCLI_AUTH=$REDIS_PASSWORD" \
    --health-cmd "redis-cli -p $redis_port ping | grep -q PONG" \
    "$services_image" redis-server /etc/collab/redis.conf >/dev/null
}

migrate() {
  log "migrating the database"
  podman_ run --rm --name "$name-migrate" "${run_flags[@]}" --no-healthcheck --env-file "$state/collab.env" \
    --env-file "$state/extra.env" "$image" collab migrate >&2
}

start_hub() {  # index (0-based)
  local hub="$name-hub$(($1 + 1))"
  exists "$hub" && return 0
  # The image's own health check (GET /healthz on COLLAB_BIND's port) fits the hub.
  podman_ run --detach --name "$hub" "${run_flags[@]}" "${health_flags[@]}" --env-file "$state/collab.env" \
    --env-file "$state/extra.env" --env "COLLAB_NODE_ID=hub$(($1 + 1))" \
    --env "COLLAB_BIND=127.0.0.1:${hub_ports[$1]}" "$image" >/dev/null
}

start_worker() {
  exists "$name-worker" && return 0
  # The worker listens on no port: its check asks the worker itself, over the broker, instead
  # of inheriting the image's :8000 check (which would call it unhealthy forever).
  # shellcheck disable=SC2016  # $(hostname) is the container's, at each check
  podman_ run --detach --name "$name-worker" "${run_flags[@]}" --env-file "$state/collab.env" \
    --env-file "$state/extra.env" \
    --health-cmd 'celery -A workers.app inspect ping --timeout 10 -d "celery@$(hostname)" >/dev/null' \
    --health-start-period 30s --health-timeout 30s "${worker_health_interval[@]}" "${health_flags[@]}" \
    "$image" collab worker --concurrency 2 >/dev/null
}

self_signed() {
  # Until the ACME server issues one (or for a local try without ACME), NGINX needs some
  # certificate to start with.
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=$domain" \
    -addext "subjectAltName=DNS:$domain" -keyout "$state/tls/privkey.pem" \
    -out "$state/tls/fullchain.pem" 2>/dev/null
  chmod 600 "$state/tls/privkey.pem"
}

start_nginx() {
  exists "$name-nginx" && return 0
  mkdir -p "$state/tls" "$state/acme" "$state/nginx-log"
  [ -s "$state/tls/fullchain.pem" ] || self_signed
  local upstreams="" port
  # max_fails=0: see the template's upstream block; a WebSocket upstream must not be "failed".
  for port in "${hub_ports[@]}"; do upstreams+="server 127.0.0.1:$port max_fails=0; "; done
  # The template is rendered with envsubst at start, as the official nginx image does; only
  # these variables, so NGINX's own ($host, $uri...) stay as they are.
  # shellcheck disable=SC2016  # the script runs in the container: expanded there, not here
  podman_ run --detach --name "$name-nginx" "${run_flags[@]}" "${health_flags[@]}" \
    --volume "$here/nginx:/etc/collab/nginx:ro" \
    --volume "$state/tls:/etc/collab/tls:ro" \
    --volume "$state/acme:/var/www/acme:ro" \
    --volume "$state/nginx-log:/var/log/nginx" \
    --env "COLLAB_UPSTREAMS=$upstreams" --env "NGINX_SERVER_NAME=$domain" \
    --env "NGINX_HTTP_PORT=$http_port" --env "NGINX_HTTPS_PORT=$https_port" \
    --env NGINX_CERT=/etc/collab/tls/fullchain.pem --env NGINX_KEY=/etc/collab/tls/privkey.pem \
    --env NGINX_ACCESS_LOG=/var/log/nginx/access.log --env NGINX_ACME_ROOT=/var/www/acme \
    --env "NGINX_WS_CONNECTIONS_PER_ADDRESS=$ws_per_address" \
    --health-cmd "bash -c 'exec 3<>/dev/tcp/127.0.0.1/$https_port'" \
    "$services_image" bash -c '
      vars="\$COLLAB_UPSTREAMS \$NGINX_SERVER_NAME \$NGINX_HTTP_PORT \$NGINX_HTTPS_PORT \$NGINX_CERT"
      vars="$vars \$NGINX_KEY \$NGINX_ACCESS_LOG \$NGINX_ACME_ROOT \$NGINX_WS_CONNECTIONS_PER_ADDRESS"
      envsubst "$vars" </etc/collab/nginx/collab.conf.template >/etc/nginx/conf.d/collab.conf
      exec nginx -g "daemon off;"' >/dev/null
}

# --- certificates ---------------------------------------------------------------------------------

certbot_() {
  mkdir -p "$state/letsencrypt" "$state/certbot"
  local env=()
  [ -z "${COLLAB_ACME_CA_BUNDLE:-}" ] || env=("REQUESTS_CA_BUNDLE=$COLLAB_ACME_CA_BUNDLE")
  env "${env[@]}" certbot --non-interactive --config-dir "$state/letsencrypt" \
    --work-dir "$state/certbot/work" --logs-dir "$state/certbot/logs" "$@"
}

install_cert() {
  # certbot's deploy hook: a new certificate is copied where NGINX reads it, and NGINX reloads
  # (a graceful reload: open connections, WebSockets included, stay with the old workers).
  local lineage="${RENEWED_LINEAGE:-$state/letsencrypt/live/$name}"
  install -m 644 "$lineage/fullchain.pem" "$state/tls/fullchain.pem.new"
  install -m 600 "$lineage/privkey.pem" "$state/tls/privkey.pem.new"
  mv "$state/tls/fullchain.pem.new" "$state/tls/fullchain.pem"
  mv "$state/tls/privkey.pem.new" "$state/tls/privkey.pem"
  podman_ exec "$name-nginx" nginx -s reload
  log "installed the certificate from $lineage; NGINX reloaded"
}

hook() {
  # The command certbot runs after a renewal: this script, with the same settings.
  printf '%q ' env "COLLAB_STACK_NAME=$name" "COLLAB_STACK_DIR=$state" \
    "COLLAB_PODMAN=${podman_cmd[*]}" "$here/stack.sh" install-cert
}

certificate() {
  [ -n "$acme_directory" ] || { log "no COLLAB_ACME_DIRECTORY: serving a self-signed certificate"; return 0; }
  if [ -d "$state/letsencrypt/live/$name" ]; then return 0; fi
  local contact=(--register-unsafely-without-email)
  [ -z "${COLLAB_ACME_EMAIL:-}" ] || contact=(--email "$COLLAB_ACME_EMAIL")
  log "requesting a certificate for $domain from $acme_directory"
  certbot_ certonly --webroot --webroot-path "$state/acme" --domain "$domain" \
    --cert-name "$name" --server "$acme_directory" --agree-tos "${contact[@]}" \
    --deploy-hook "$(hook)" >&2
}

renew() {
  # Run by hand with --force: now. From a timer: certbot's random delay (up to 8 minutes) stays,
  # so that renewals do not all reach the ACME server at the same moment.
  local force=()
  [ "${1:-}" != --force ] || force=(--force-renewal --no-random-sleep-on-renew)
  certbot_ renew "${force[@]}" --deploy-hook "$(hook)" >&2
}

# --- commands -------------------------------------------------------------------------------------

up() {
  command -v podman >/dev/null || die "podman is not installed (apt-get install podman runc)"
  secrets
  collab_env
  images
  start_postgres
  start_redis
  wait_healthy "$name-postgres" 60
  wait_healthy "$name-redis" 30
  migrate
  local i
  for i in "${!hub_ports[@]}"; do start_hub "$i"; done
  start_worker
  for hub in $(hubs); do wait_healthy "$hub" 60; done
  start_nginx
  wait_healthy "$name-nginx" 30
  certificate
  wait_healthy "$name-worker" 90
  log "up: $(origin)/ (chat at $(origin)/chat)"
}

down() {
  local container
  for container in $(containers); do
    # Hubs get their shutdown time to close WebSockets with 1001.
    if exists "$container"; then podman_ rm --force --time 20 "$container" >/dev/null; fi
  done
  podman_ rm --force "$name-migrate" >/dev/null 2>&1 || true
  if [ "${1:-}" = --volumes ]; then
    podman_ volume rm --force "$name-pgdata" "$name-redisdata" >/dev/null 2>&1 || true
  fi
  log "down"
}

rolling_restart() {
  local i hub
  for i in "${!hub_ports[@]}"; do
    hub="$name-hub$((i + 1))"
    # SIGTERM: the node closes every WebSocket with 1001 ("reconnect and recover") and NGINX
    # sends the reconnections to the nodes still up. The container is made again from the
    # current image (an upgrade, or the same image) and checked healthy before the next goes.
    log "restarting $hub"
    podman_ rm --force --time 20 "$hub" >/dev/null
    start_hub "$i"
    wait_healthy "$hub" 60
  done
}

upgrade() {
  # A new release without downtime: build the image, migrate (the schema must suit the old
  # release and the new one, as every migration here does), roll the hubs, then the worker
  # (it stops warm: the batches it holds go back to the broker and are stored once).
  secrets
  collab_env
  COLLAB_STACK_BUILD=always images
  migrate
  rolling_restart
  podman_ rm --force --time 60 "$name-worker" >/dev/null
  start_worker
  wait_healthy "$name-worker" 90
}

status() {
  local container
  for container in $(containers); do
    if exists "$container"; then
      podman_ healthcheck run "$container" >/dev/null 2>&1 || true
      printf '%-24s %s\n' "$container" "$(podman_ inspect -f '{{.State.Status}} {{.State.Health.Status}}' "$container")"
    else
      printf '%-24s %s\n' "$container" absent
    fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down "${2:-}" ;;
  status) status ;;
  renew) secrets >/dev/null; renew "${2:-}" ;;
  install-cert) install_cert ;;
  rolling-restart) rolling_restart ;;
  upgrade) upgrade ;;
  logs) podman_ logs "$name-${2:?which container}" ;;
  *) sed -n '2,10p' "$0" >&2; exit 2 ;;
esac
