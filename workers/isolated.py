"""A Celery queue of one's own on a shared broker, and how to remove it afterwards.

Test runs and benchmark runs share the machine's Redis and RabbitMQ with each other and with
whatever else runs there; each takes a queue (and on Redis a key prefix) nobody else uses,
hands its settings to the processes it starts, and deletes what it made when done.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass, field
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
    def on_rabbitmq(cls, amqp_url: str, prefix: str) -> IsolatedBroker:
        return cls(kind="amqp", url=amqp_url, queue=f"{prefix}.{uuid.uuid4().hex[:10]}")

    def env(self) -> dict[str, str]:
        """The settings (`COLLAB_CELERY_*`) that point a server or worker at this queue."""
        return {
            "COLLAB_CELERY_BROKER_URL": self.url,
            "COLLAB_CELERY_QUEUE": self.queue,
            "COLLAB_CELERY_BROKER_TRANSPORT_OPTIONS": orjson.dumps(self.options).decode(),
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
