"""A Celery queue of one's own on a shared broker, and `collab worker` processes to serve it.

Test runs and benchmark runs share the machine's Redis and RabbitMQ with each other and with
whatever else runs there; each takes a queue (and on Redis a key prefix) nobody else uses,
hands its settings to the worker processes it starts, stops those by their process group, and
deletes what it made when done.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import orjson


@dataclass
class IsolatedBroker:
    """A broker URL, a queue nobody else uses, and the transport options that isolate it."""

    kind: str  # "redis" or "amqp"
    url: str
    queue: str
    options: dict[str, Any] = field(default_factory=dict)
    queue_type: str = "classic"  # RabbitMQ's "classic" or "quorum"

    @classmethod
    def on_redis(cls, redis_url: str, db: int, prefix: str, **options: Any) -> IsolatedBroker:
        """In Redis database `db`, under a key prefix of its own (`prefix` and a fresh tag)."""
        parts = urlsplit(redis_url)
        tag = uuid.uuid4().hex[:10]
        return cls(
            kind="redis",
            url=urlunsplit((parts.scheme, parts.netloc, f"/{db}", "", "")),
            queue=f"{prefix}.{tag}",
            options={"global_keyprefix": f"{prefix.replace('.', '-')}-{tag}:", **options},
        )

    @classmethod
    def on_rabbitmq(cls, amqp_url: str, prefix: str, *, quorum: bool = False) -> IsolatedBroker:
        """A queue of its own in the default vhost; a quorum queue when `quorum`."""
        return cls(
            kind="amqp",
            url=amqp_url,
            queue=f"{prefix}.{uuid.uuid4().hex[:10]}",
            queue_type="quorum" if quorum else "classic",
        )

    def env(self) -> dict[str, str]:
        """The settings (`COLLAB_CELERY_*`) that point a server or worker at this queue."""
        return {
            "COLLAB_CELERY_BROKER_URL": self.url,
            "COLLAB_CELERY_QUEUE": self.queue,
            "COLLAB_CELERY_BROKER_TRANSPORT_OPTIONS": orjson.dumps(self.options).decode(),
            "COLLAB_CELERY_QUEUE_TYPE": self.queue_type,
        }

    def cleanup(self) -> None:
        """Delete the queue and everything under the key prefix; what is gone stays gone."""
        if self.kind == "redis":
            import redis

            client = redis.Redis.from_url(self.url)
            try:
                keys = list(client.scan_iter(match=f"{self.options['global_keyprefix']}*"))
                if keys:
                    client.delete(*keys)
            finally:
                client.close()
            return
        from kombu import connection as kombu_connection

        kombu: Any = kombu_connection  # kombu has no type hints
        with kombu.Connection(self.url, connect_timeout=5) as connection:
            channel = connection.default_channel
            with contextlib.suppress(Exception):
                channel.queue_delete(self.queue)
            with contextlib.suppress(Exception):
                channel.exchange_delete(self.queue)


@dataclass
class WorkerProcess:
    """One `collab worker` (a Celery worker and its pool) in a process group of its own.

    `env` carries its settings (an `IsolatedBroker.env()`, the database); it is stopped with
    SIGKILL to the whole group, which is also what the tests do to it on purpose. It is ready
    when Celery logs "ready", or, with a quieter `loglevel`, when `ready()` says so.
    """

    env: dict[str, str]
    log_path: Path
    concurrency: int = 2
    name: str = "collab-test"
    loglevel: str = "INFO"
    ready: Callable[[], bool] | None = None
    process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> WorkerProcess:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "collab",
                    "worker",
                    "--concurrency",
                    str(self.concurrency),
                    "--pool",
                    "prefork",
                    "--without-mingle",
                    "--without-gossip",
                    "--without-heartbeat",
                    "--loglevel",
                    self.loglevel,
                    "--hostname",
                    f"{self.name}-{uuid.uuid4().hex[:8]}@%h",
                ],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited early:\n{self.log()}")
            if self.ready is not None:
                if self.ready():
                    return self
            elif " ready." in self.log_path.read_text(errors="replace")[offset:]:
                return self
            time.sleep(0.1)
        self.kill()
        raise RuntimeError(f"worker not ready within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def kill(self) -> None:
        """SIGKILL to the worker's whole process group: the main process and its pool."""
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
