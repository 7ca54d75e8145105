"""Gunicorn for Collab: `gunicorn -c deploy/gunicorn.conf.py`.

One worker process is one hub node; run a few per machine (about one per core) and let
Redis join them. Workers are Uvicorn workers with Collab's WebSocket settings.
"""

import multiprocessing
import os

from collab.settings import Settings

wsgi_app = "collab.app:create_app_from_env()"
worker_class = "collab.gunicorn_worker.CollabWorker"
bind = os.environ.get("COLLAB_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("COLLAB_WORKERS", multiprocessing.cpu_count()))
# Several workers on the memory broker would split every room: refuse, and say what to set.
_refusal = Settings().refuse_processes(workers)
if _refusal is not None:
    raise SystemExit(_refusal)
# WebSockets live long: no request timeout kills a busy worker mid-connection, and a
# restart gives clients time to be told 1001 and to reconnect elsewhere.
timeout = 60
graceful_timeout = int(os.environ.get("COLLAB_SHUTDOWN_TIMEOUT", "10")) + 5
keepalive = 5
# The proxy in front (NGINX) sets X-Forwarded-*; trust only it. The address a request is
# rate-limited under comes from there, so trusting anyone ("*") lets every client pick its own.
forwarded_allow_ips = os.environ.get("COLLAB_FORWARDED_ALLOW_IPS", "127.0.0.1")
if "*" in [part.strip() for part in forwarded_allow_ips.split(",")]:
    raise SystemExit(
        "COLLAB_FORWARDED_ALLOW_IPS must name the proxy's addresses, not '*': any client could "
        "then choose the address it is rate-limited under"
    )
accesslog = "-"
errorlog = "-"
