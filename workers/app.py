"""The Celery app, built from the same `Settings` as the server.

`create_celery_app(settings)` is the client side (the server's Celery sink sends with it);
`create_worker_app(settings)` adds the tasks and the per-process database engine for
`collab worker`. `celery -A workers.app worker` works too: the module attribute `app` is built
from the environment on first use, never at import.

Celery is imported here lazily (inside functions), so `pip install .` without the
`production` extra still imports every package.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collab.settings import Settings

log = logging.getLogger("collab.workers")

REDIS_SCHEMES = frozenset({"redis", "rediss", "redis+socket", "sentinel"})
AMQP_SCHEMES = frozenset({"amqp", "amqps", "pyamqp"})


def broker_kind(url: str) -> str:
    """The broker family, "redis" or "amqp", from the URL's scheme."""
    scheme = url.split("://", 1)[0]
    if scheme in REDIS_SCHEMES:
        return "redis"
    if scheme in AMQP_SCHEMES:
        return "amqp"
    raise ValueError(f"unsupported Celery broker scheme {scheme!r}")


def transport_options(settings: Settings, *, producer: bool = False) -> dict[str, Any]:
    """Our defaults for the broker, then whatever COLLAB_CELERY_BROKER_TRANSPORT_OPTIONS says."""
    assert settings.celery_broker_url is not None
    options: dict[str, Any]
    if broker_kind(settings.celery_broker_url) == "redis":
        options = {
            # A message a worker took and never acknowledged (the worker died) goes back to the
            # queue this long after delivery: the upper bound on redelivery after a crash.
            "visibility_timeout": 3600,
            # Look for such messages every 10 s, not every 10 x 10 s (kombu's default throttle).
            "unacked_restore_interval": 10,
            "unacked_restore_throttle": 1,
            "socket_connect_timeout": 5,
        }
        if producer:
            # A broker that vanishes without closing the connection must not hang a publish.
            options["socket_timeout"] = 10
    else:
        # The broker confirms each publish once it has taken the message (and, for a durable
        # queue and a persistent message, written it; for a quorum queue, once a majority of
        # its replicas has): only then is a batch acknowledged.
        options = {"confirm_publish": True}
    options.update(settings.celery_broker_transport_options)
    return options


def durable_queue(name: str, queue_type: str = "classic") -> Any:
    """A durable queue bound to a durable exchange of the same name.

    A classic queue hangs off a direct exchange. A quorum queue hangs off a topic exchange:
    a quorum queue has no global QoS, so a worker cannot hold a delayed retry (a countdown)
    while taking more work; Celery then routes the retry through RabbitMQ's native delayed
    delivery exchanges instead, which can only reach a queue bound to a topic (or fanout)
    exchange. With a direct exchange the retry would sit in the worker until it is due.
    """
    from kombu import entity

    kombu: Any = entity  # kombu's constructors carry no annotations
    if queue_type == "quorum":
        return kombu.Queue(
            name,
            kombu.Exchange(name, type="topic", durable=True),
            routing_key=name,
            durable=True,
            queue_arguments={"x-queue-type": "quorum"},
        )
    return kombu.Queue(
        name, kombu.Exchange(name, type="direct", durable=True), routing_key=name, durable=True
    )


def celery_config(settings: Settings, *, producer: bool = False) -> dict[str, Any]:
    from persistence.celery_sink import STORE_BATCH_TASK

    queue = settings.celery_queue
    return {
        "broker_url": settings.celery_broker_url,
        "broker_transport_options": transport_options(settings, producer=producer),
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,  # a worker waits for its broker forever
        "result_backend": None,
        "task_ignore_result": True,
        # JSON only: a worker never unpickles what a broker hands it.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        # A durable queue and persistent messages: RabbitMQ keeps queued batches across a
        # restart (Redis keeps them as far as its own persistence settings do).
        "task_queues": [durable_queue(queue, settings.celery_queue_type)],
        "task_default_queue": queue,
        "task_default_queue_type": settings.celery_queue_type,
        "task_routes": {STORE_BATCH_TASK: {"queue": queue}},
        "task_default_delivery_mode": "persistent",
        "task_create_missing_queues": False,
        # Acknowledge a batch after it is stored; a worker that dies mid-batch gives it back.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # A batch running when the broker connection drops cannot be acknowledged any more;
        # it comes back from the broker anyway, so stop it (Celery 6's default).
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "worker_send_task_events": False,
        "task_send_sent_event": False,
    }


def create_celery_app(settings: Settings, *, producer: bool = False) -> Any:
    """A configured Celery app without tasks: what the server's sink sends with."""
    if not settings.celery_broker_url:
        raise ValueError("COLLAB_CELERY_BROKER_URL is not set")
    from celery import Celery

    app = Celery("collab", set_as_current=False)
    app.conf.update(celery_config(settings, producer=producer))
    return app


def create_worker_app(settings: Settings) -> Any:
    """The app `collab worker` runs: the configuration above plus the batch task."""
    from workers.metrics import setup_metrics
    from workers.tasks import register

    setup_metrics(settings.celery_metrics_port, settings.celery_metrics_address)
    app = create_celery_app(settings)
    register(app, settings)
    options = app.conf.broker_transport_options
    if "visibility_timeout" in options and (
        float(options["visibility_timeout"]) <= settings.celery_retry_backoff_max
    ):
        log.warning(
            "the Redis visibility timeout (%ss) is not above COLLAB_CELERY_RETRY_BACKOFF_MAX "
            "(%ss): a batch waiting for its retry may be delivered twice (stored once)",
            options["visibility_timeout"],
            settings.celery_retry_backoff_max,
        )
    return app


_app_from_env: Any = None


def __getattr__(name: str) -> Any:
    # `celery -A workers.app` looks up `app` (then `celery`) on this module.
    global _app_from_env
    if name not in ("app", "celery"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app_from_env is None:
        from collab.settings import Settings

        _app_from_env = create_worker_app(Settings())
    return _app_from_env
