"""The Celery sink against real brokers, with no worker: what an acknowledgement means.

- One task per batch, its argument JSON (never pickle), every field of every message in it.
- On RabbitMQ, an acknowledged batch is in a durable queue as a persistent message (the
  broker confirmed it).
- When the broker refuses connections or never answers, `store` raises SinkUnavailable
  (the node then answers `unavailable`), and the event loop never waits on the broker.
- `close` sends what is still pending.
- With a Redis that persists every write, acknowledged batches outlive a crash of the broker,
  and the sink reconnects by itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from loadtests.isolated import IsolatedBroker
from persistence.celery_sink import STORE_BATCH_TASK, CeleryMessageSink, decode_message
from realtime.protocol import utc_timestamp
from realtime.storage import SinkUnavailable, StoredMessage
from realtime.types import UserInfo, new_msg_id
from tests.conftest import make_settings
from tests.processes import RedisServer, require_redis_server
from tests.services import free_port
from workers.app import create_celery_app

pytestmark = pytest.mark.slow


def messages(count: int, room: str = "sink-room") -> list[StoredMessage]:
    return [
        StoredMessage(
            msg_id=new_msg_id(),
            room=room,
            epoch="e1",
            offset=n,
            user=UserInfo(str(n % 3), f"user {n % 3}"),
            body={"text": f"message {n}", "nested": {"n": n, "ok": True}, "list": [1, "a"]},
            client_msg_id=f"c{n}" if n % 2 else None,
            ts=utc_timestamp(),
        )
        for n in range(1, count + 1)
    ]


def make_sink(broker: IsolatedBroker, **kwargs: Any) -> CeleryMessageSink:
    settings = make_settings(
        "sqlite+aiosqlite:///unused.db",
        celery_broker_url=broker.url,
        celery_queue=broker.queue,
        celery_broker_transport_options=broker.options,
    )
    return CeleryMessageSink(
        create_celery_app(settings, producer=True), queue_name=broker.queue, **kwargs
    )


@contextlib.asynccontextmanager
async def running(sink: CeleryMessageSink) -> AsyncIterator[CeleryMessageSink]:
    await sink.start()
    try:
        yield sink
    finally:
        await sink.close()


def queued_in_redis(broker: IsolatedBroker) -> list[dict[str, Any]]:
    """The task messages waiting in the broker's list, oldest first."""
    import redis

    client = redis.Redis.from_url(broker.url)
    try:
        raw = client.lrange(f"{broker.options['global_keyprefix']}{broker.queue}", 0, -1)
    finally:
        client.close()
    return [json.loads(item) for item in reversed(raw)]  # LPUSH puts the newest first


def task_messages(envelope: dict[str, Any]) -> list[StoredMessage]:
    assert envelope["content-type"] == "application/json"
    assert envelope["headers"]["task"] == STORE_BATCH_TASK
    body = envelope["body"]
    if envelope["properties"].get("body_encoding") == "base64":
        body = base64.b64decode(body)
    args, kwargs, _embed = json.loads(body)
    assert kwargs == {}
    return [decode_message(item) for item in args[0]]


@pytest.mark.redis
async def test_one_json_task_per_batch(redis_celery_broker: IsolatedBroker) -> None:
    sent = messages(250)
    async with running(make_sink(redis_celery_broker, max_batch=100, max_delay=0.05)) as sink:
        await asyncio.gather(*(sink.store(m) for m in sent))
        # Every store has returned: every batch is in Redis now, not later.
        envelopes = queued_in_redis(redis_celery_broker)
        assert (sink.tasks_sent, sink.messages_sent) == (3, 250)
    batches = [task_messages(e) for e in envelopes]
    assert [len(b) for b in batches] == [100, 100, 50]
    assert [m for batch in batches for m in batch] == sent


@pytest.mark.redis
async def test_a_batch_closes_after_its_delay(redis_celery_broker: IsolatedBroker) -> None:
    async with running(make_sink(redis_celery_broker, max_batch=500, max_delay=0.05)) as sink:
        started = time.monotonic()
        await asyncio.gather(*(sink.store(m) for m in messages(7)))
        assert 0.04 <= time.monotonic() - started < 2.0
        await sink.store(messages(1)[0])
    assert [len(task_messages(e)) for e in queued_in_redis(redis_celery_broker)] == [7, 1]


@pytest.mark.rabbitmq
async def test_rabbitmq_acknowledged_batches_are_in_a_durable_queue(
    rabbitmq_celery_broker: IsolatedBroker,
) -> None:
    from amqp.exceptions import PreconditionFailed
    from kombu.connection import Connection

    broker = rabbitmq_celery_broker
    sink = make_sink(broker, max_batch=100, max_delay=0.05)
    assert sink.app.conf.broker_transport_options["confirm_publish"] is True
    sent = messages(250)
    async with running(sink):
        await asyncio.gather(*(sink.store(m) for m in sent))
    with Connection(broker.url, connect_timeout=5) as connection:  # type: ignore[no-untyped-call]
        channel = connection.channel()
        _, waiting, _ = channel.queue_declare(broker.queue, passive=True)
        assert waiting == 3
        received = []
        for _ in range(3):
            message = channel.basic_get(broker.queue, no_ack=False)
            assert message.properties["delivery_mode"] == 2  # persistent
            received.append(
                task_messages(
                    {
                        "content-type": message.content_type,
                        "headers": message.headers,
                        "properties": {},
                        "body": message.body,
                    }
                )
            )
        channel.close()  # unacknowledged: the messages go back to the queue
        # A durable queue: declaring it as non-durable is refused.
        channel = connection.channel()
        with pytest.raises(PreconditionFailed):
            channel.queue_declare(broker.queue, durable=False)
    assert sorted((m for batch in received for m in batch), key=lambda m: m.offset) == sent


async def loop_stall_while(work: Callable[[], Awaitable[None]]) -> float:
    """The longest the event loop went without running a 10 ms ticker while `work` ran."""
    longest = 0.0
    done = False

    async def ticker() -> None:
        nonlocal longest
        last = time.monotonic()
        while not done:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            longest = max(longest, now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    try:
        await work()
    finally:
        done = True
        await ticking
    return longest


@pytest.mark.parametrize("kind", ["redis", "amqp"])
async def test_a_refusing_broker_means_unavailable(kind: str) -> None:
    port = free_port()  # nothing listens there
    url = f"redis://127.0.0.1:{port}/0" if kind == "redis" else f"amqp://127.0.0.1:{port}//"
    broker = IsolatedBroker(kind=kind, url=url, queue="collab.unreachable")
    sink = make_sink(broker, max_batch=10, max_delay=0.01, send_timeout=3.0)

    async def work() -> None:
        results = await asyncio.gather(
            *(sink.store(m) for m in messages(25)), return_exceptions=True
        )
        assert all(isinstance(r, SinkUnavailable) for r in results), results

    async with running(sink):
        started = time.monotonic()
        stall = await loop_stall_while(work)
        assert time.monotonic() - started < 5.0
    assert stall < 0.25
    assert sink.healthy is False and sink.tasks_sent == 0


@pytest.mark.redis
async def test_a_silent_broker_times_out_without_blocking_the_loop() -> None:
    """A broker that takes the connection and never answers: `store` gives up after the send
    timeout, while the sender thread is still stuck in its publish."""
    connections: list[asyncio.StreamWriter] = []

    async def accept_and_say_nothing(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(accept_and_say_nothing, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    broker = IsolatedBroker(
        kind="redis",
        url=f"redis://127.0.0.1:{port}/0",
        queue="collab.silent",
        options={"socket_timeout": 2, "socket_connect_timeout": 2},
    )
    sink = make_sink(broker, max_batch=10, max_delay=0.01, send_timeout=1.0)

    async def work() -> None:
        started = time.monotonic()
        with pytest.raises(SinkUnavailable):
            await sink.store(messages(1)[0])
        assert 0.9 <= time.monotonic() - started < 3.0

    try:
        async with running(sink):
            stall = await loop_stall_while(work)
        assert stall < 0.25
        assert connections, "the sink never reached the silent broker"
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


@pytest.mark.redis
async def test_close_sends_what_is_pending(redis_celery_broker: IsolatedBroker) -> None:
    sink = make_sink(redis_celery_broker, max_batch=500, max_delay=30.0)
    await sink.start()
    pending = [asyncio.create_task(sink.store(m)) for m in messages(10)]
    await asyncio.sleep(0.05)
    assert not any(task.done() for task in pending)  # the batch is still open
    await sink.close()
    await asyncio.gather(*pending)  # acknowledged: sent on close, not dropped
    assert [len(task_messages(e)) for e in queued_in_redis(redis_celery_broker)] == [10]
    with pytest.raises(SinkUnavailable):
        await sink.store(messages(1)[0])


@pytest.mark.redis
async def test_acked_batches_outlive_a_broker_crash_and_the_sink_reconnects(
    tmp_path: Path,
) -> None:
    """With Redis persisting every write (AOF, `appendfsync always`), what was acknowledged
    before a SIGKILL of the broker is still queued after its restart; meanwhile `store` says
    `unavailable`, and once the broker is back the sink sends again by itself."""
    require_redis_server()
    server = RedisServer(tmp_path, persistent=True)
    server.start()
    broker = IsolatedBroker(
        kind="redis",
        url=server.url,
        queue="collab.crash",
        options={"global_keyprefix": "crash:", "socket_timeout": 2},
    )
    sink = make_sink(broker, max_batch=100, max_delay=0.01, send_timeout=3.0)
    before, during, after = messages(250), messages(10), messages(50)
    try:
        async with running(sink):
            await asyncio.gather(*(sink.store(m) for m in before))
            server.kill()
            results = await asyncio.gather(*(sink.store(m) for m in during), return_exceptions=True)
            assert all(isinstance(r, SinkUnavailable) for r in results), results
            server.start()
            await asyncio.gather(*(sink.store(m) for m in after))
        queued = [m for envelope in queued_in_redis(broker) for m in task_messages(envelope)]
    finally:
        server.kill()
    assert queued == before + after


def test_quorum_queues_are_rabbitmq_only() -> None:
    """A quorum queue is a RabbitMQ queue type: asking for one on Redis is refused at start,
    and on RabbitMQ the queue is declared as one, on a topic exchange (delayed retries)."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="COLLAB_CELERY_QUEUE_TYPE=quorum needs RabbitMQ"):
        make_settings(
            "sqlite+aiosqlite:///unused.db",
            celery_broker_url="redis://127.0.0.1:6379/0",
            celery_queue_type="quorum",
        )
    settings = make_settings(
        "sqlite+aiosqlite:///unused.db",
        celery_broker_url="amqp://guest:guest@127.0.0.1:5672//",
        celery_queue_type="quorum",
    )
    (queue,) = create_celery_app(settings).conf.task_queues
    assert queue.queue_arguments == {"x-queue-type": "quorum"}
    assert queue.exchange.type == "topic"
