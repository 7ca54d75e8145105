"""Gunicorn worker class: `uvicorn_worker.UvicornWorker` with Collab's WebSocket settings.

`collab serve` passes these to uvicorn itself; under Gunicorn the worker class is the only
place to set them (`-k collab.gunicorn_worker.CollabWorker`). The same goes for the filter
that keeps tokens out of the logs: the base class hands Gunicorn's handlers to uvicorn's
loggers, and the filter goes on them here, whatever log configuration Gunicorn was given.
"""

from __future__ import annotations

from typing import Any

from uvicorn_worker import UvicornWorker

from collab import redaction
from collab.settings import Settings
from collab.websocket_protocol import protocol_classes


class CollabWorker(UvicornWorker):  # type: ignore[misc]  # untyped base
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        settings = Settings()
        http_protocol, ws_protocol = protocol_classes()
        self.CONFIG_KWARGS = {
            "loop": "auto",
            "http": http_protocol,
            "ws": ws_protocol,
            "ws_per_message_deflate": False,
            "ws_max_size": settings.max_frame_bytes,
            "ws_ping_interval": settings.heartbeat,
            "ws_ping_timeout": settings.heartbeat,
            "proxy_headers": True,
            "timeout_graceful_shutdown": int(settings.shutdown_timeout) or None,
        }
        super().__init__(*args, **kwargs)
        redaction.install("uvicorn.error", "uvicorn.access", "gunicorn.error", "gunicorn.access")
