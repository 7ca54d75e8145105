"""The persistence benchmark: messages per second from publish to stored row, through Celery.

What it measures is the pipeline behind an ack: the Celery sink (the object a node hands each
accepted message to, right after the Redis offset script), the broker, one `collab worker`
and PostgreSQL. It does not measure WebSocket handling (see `loadtests.fanout`). Two modes:

- *batched*: the production settings, a batch closes at 500 messages or 5 ms;
- *unbatched*: one task per message (`max_batch=1`), what the batching saves.

With `--reconciler`, the runs take the whole path of a node instead, in two interleaved
modes: *published*, each message first published to its room through the Redis room broker
(the offset script, `durable=True`, as `Node.publish` does) and then stored; and
*reconciled*, the same with the storage reconciler running beside it in this process (grace
1 s, a pass every 0.5 s, so it verifies every room all the time: its worst case). The ratio
of the two is what the reconciler costs.

Each run stores `--messages` new messages (a fresh `msg_id` each, as many rooms as
`--rooms`) from `--in-flight` publishers (the connections of a node), each waiting for its
ack before sending the next, and times

- *acked/s*: until the last `store` returned (every message is in the broker);
- *stored/s*: until the last row is committed (polled with `count(*)`, every 50 ms);
- *lag p50/p99*: from acceptance to commit, from the worker's own histogram (the upper bound
  of the bucket the quantile falls in).

Everything runs on this machine, started here and stopped by PID: a throwaway PostgreSQL
database (created, migrated, dropped), a queue of its own on the broker (Redis database 12
under a key prefix of its own, or a queue of its own on RabbitMQ), one worker process group.

    python -m loadtests.bench_persistence --messages 20000
    python -m loadtests.bench_persistence --messages 20000 --broker amqp --runs 5

Figures are medians over `--runs`; on a shared machine, quote medians, not best runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import statistics
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from loadtests.isolated import IsolatedBroker, WorkerProcess

REPO = Path(__file__).resolve().parent.parent
POSTGRES_URL = os.environ.get(
    "COLLAB_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("COLLAB_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
RABBITMQ_URL = os.environ.get("COLLAB_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")
BENCH_REDIS_DB = 12
# Rooms (offset script, window, storage marks) for `--reconciler`, in a database of their own
# that each run empties first.
ROOMS_REDIS_URL = os.environ.get("COLLAB_BENCH_ROOMS_REDIS_URL", "redis://127.0.0.1:6379/11")


@dataclass
class Result:
    mode: str
    run: int
    messages: int
    acked_s: float
    stored_s: float
    tasks: int
    lag_p50: float
    lag_p99: float

    @property
    def acked_rate(self) -> float:
        return self.messages / self.acked_s

    @property
    def stored_rate(self) -> float:
        return self.messages / self.stored_s


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _admin_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _pg(url: str, *statements: str) -> Any:
    import asyncpg

    connection = await asyncpg.connect(_admin_dsn(url))
    try:
        result = None
        for statement in statements:
            result = await connection.fetchval(statement)
        return result
    finally:
        await connection.close()


def _answers(port: int) -> bool:
    try:
        scrape(port)
    except OSError:
        return False
    return True


def scrape(port: int) -> dict[str, float]:
    """The worker's Prometheus samples (`COLLAB_CELERY_METRICS_PORT`), by full name."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def lag_quantile(before: dict[str, float], after: dict[str, float], q: float) -> float:
    """The upper bound of the histogram bucket holding quantile `q` of this run's lags."""
    prefix = 'collab_persist_lag_seconds_bucket{le="'
    buckets = []
    for name, count in after.items():
        if name.startswith(prefix):
            upper = float(name[len(prefix) : -2])
            buckets.append((upper, count - before.get(name, 0.0)))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


async def one_run(
    mode: str,
    run: int,
    count: int,
    args: argparse.Namespace,
    broker: IsolatedBroker,
    metrics_port: int,
) -> Result:
    from collab.settings import Settings
    from persistence.celery_sink import CeleryMessageSink
    from realtime.protocol import utc_timestamp
    from realtime.storage import StoredMessage
    from realtime.types import UserInfo, new_msg_id
    from workers.app import create_celery_app

    await _pg(args.database_url, "TRUNCATE messages")
    if mode in ("published", "reconciled"):
        return await path_run(mode, run, count, args, broker, metrics_port)
    settings = Settings(
        env="test",
        database_url=args.database_url,
        celery_broker_url=broker.url,
        celery_queue=broker.queue,
        celery_broker_transport_options=broker.options,
    )
    batched = mode == "batched"
    sink = CeleryMessageSink(
        create_celery_app(settings, producer=True),
        queue_name=broker.queue,
        max_batch=500 if batched else 1,
        max_delay=0.005 if batched else 0.0,
        send_timeout=30.0,
    )
    epoch = uuid.uuid4().hex[:8]
    users = [UserInfo(str(i), f"user {i}") for i in range(10)]
    # Message ids are the node's work, made before the clock starts; `ts` (acceptance, where
    # the lag is measured from) is taken at publish time.
    msg_ids = [new_msg_id() for _ in range(count)]

    async def publisher(first: int, step: int) -> None:
        # One of `in_flight` publishers, each waiting for its ack before the next message,
        # as the connections of a node do (an asyncio.Semaphore with thousands of waiters
        # costs more than what it measures).
        for n in range(first, count, step):
            await sink.store(
                StoredMessage(
                    msg_id=msg_ids[n],
                    room=f"bench-{n % args.rooms}",
                    epoch=epoch,
                    offset=n // args.rooms + 1,
                    user=users[n % len(users)],
                    body={"text": f"benchmark message {n}", "n": n},
                    client_msg_id=None,
                    ts=utc_timestamp(),
                )
            )

    before = scrape(metrics_port)
    await sink.start()
    acked, stored = await timed(mode, run, count, args, publisher)
    tasks = sink.tasks_sent
    await sink.close()
    return await result(mode, run, count, acked, stored, tasks, before, metrics_port)


async def timed(
    mode: str,
    run: int,
    count: int,
    args: argparse.Namespace,
    publisher: Callable[[int, int], Awaitable[None]],
) -> tuple[float, float]:
    """Run the publishers; seconds until the last ack, and until the last row is committed."""
    import asyncpg

    started = time.perf_counter()
    publishers = min(args.in_flight, count)
    await asyncio.gather(*(publisher(i, publishers) for i in range(publishers)))
    acked = time.perf_counter() - started
    connection = await asyncpg.connect(_admin_dsn(args.database_url))
    try:
        while await connection.fetchval("SELECT count(*) FROM messages") < count:
            if time.perf_counter() - started > args.timeout:
                raise RuntimeError(f"{mode} run {run}: not all {count} stored in time")
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    return acked, time.perf_counter() - started


async def result(
    mode: str,
    run: int,
    count: int,
    acked: float,
    stored: float,
    tasks: int,
    before: dict[str, float],
    metrics_port: int,
) -> Result:
    await asyncio.sleep(0.3)  # let the exporter see the last batch
    after = scrape(metrics_port)
    return Result(
        mode=mode,
        run=run,
        messages=count,
        acked_s=acked,
        stored_s=stored,
        tasks=tasks,
        lag_p50=lag_quantile(before, after, 0.5),
        lag_p99=lag_quantile(before, after, 0.99),
    )


async def path_run(
    mode: str,
    run: int,
    count: int,
    args: argparse.Namespace,
    broker: IsolatedBroker,
    metrics_port: int,
) -> Result:
    """Publish through the room broker, then store; the reconciler too in `reconciled`."""
    from collab.settings import Settings
    from persistence.celery_sink import CeleryMessageSink
    from persistence.database import create_engine, create_session_factory
    from persistence.ledger import DatabaseLedger
    from realtime.broker_redis import RedisBroker
    from realtime.protocol import message_fields, utc_timestamp
    from realtime.reconciler import Reconciler
    from realtime.storage import StoredMessage
    from realtime.types import UserInfo, new_msg_id
    from workers.app import create_celery_app

    settings = Settings(
        env="test",
        database_url=args.database_url,
        celery_broker_url=broker.url,
        celery_queue=broker.queue,
        celery_broker_transport_options=broker.options,
    )
    sink = CeleryMessageSink(
        create_celery_app(settings, producer=True),
        queue_name=broker.queue,
        max_batch=500,
        max_delay=0.005,
        send_timeout=30.0,
    )
    rooms = RedisBroker(ROOMS_REDIS_URL, node_id="bench")
    import redis.asyncio as aioredis

    scratch = aioredis.Redis.from_url(ROOMS_REDIS_URL)
    try:  # the database is the benchmark's own: no room of an earlier run may count here
        await scratch.flushdb()
    finally:
        await scratch.aclose()
    engine = create_engine(args.database_url)
    reconciler = Reconciler(
        rooms, DatabaseLedger(create_session_factory(engine)), grace=1.0, interval=0.5
    )
    tag = uuid.uuid4().hex[:8]
    users = [UserInfo(str(i), f"user {i}") for i in range(10)]

    class Quiet:
        def on_publication(self, publication: object) -> None: ...
        def on_event(self, channel: str, frame: bytes, exclude_user: str | None) -> None: ...
        def on_presence(self, channel: str, frame: bytes) -> None: ...
        def on_resubscribed(self, channels: list[str]) -> None: ...

    async def publisher(first: int, step: int) -> None:
        for n in range(first, count, step):
            room = f"bench-{tag}-{n % args.rooms}"
            msg_id, ts, user = new_msg_id(), utc_timestamp(), users[n % len(users)]
            body = {"text": f"benchmark message {n}", "n": n}
            result = await rooms.publish(
                "room:" + room,
                kind="message",
                name_key="room",
                msg_id=msg_id,
                fields=message_fields(msg_id, None, user, body, ts),
                durable=True,
            )
            await sink.store(
                StoredMessage(msg_id, room, result.epoch, result.offset, user, body, None, ts)
            )

    before = scrape(metrics_port)
    await rooms.start(Quiet())
    await sink.start()
    if mode == "reconciled":
        reconciler.start()
    acked, stored = await timed(mode, run, count, args, publisher)
    tasks = sink.tasks_sent
    await reconciler.close()
    if mode == "reconciled" and reconciler.restored:
        print(f"  (the reconciler stored {reconciler.restored} messages again)")
    await sink.close()
    await rooms.close()
    await engine.dispose()
    return await result(mode, run, count, acked, stored, tasks, before, metrics_port)


def print_result(r: Result) -> None:
    print(
        f"  {r.mode:<9} run {r.run}: {r.messages:>6} messages, {r.tasks:>6} tasks, "
        f"acked {r.acked_rate:>8.0f}/s, stored {r.stored_rate:>8.0f}/s, "
        f"lag p50 <= {r.lag_p50:g}s, p99 <= {r.lag_p99:g}s",
        flush=True,
    )


def summary(results: list[Result]) -> None:
    print("\nmedians:")
    for mode in ("batched", "unbatched", "published", "reconciled"):
        rows = [r for r in results if r.mode == mode]
        if not rows:
            continue
        print(
            f"  {mode:<9} {rows[0].messages:>6} messages x {len(rows)} runs: "
            f"stored {statistics.median(r.stored_rate for r in rows):>8.0f} msg/s, "
            f"acked {statistics.median(r.acked_rate for r in rows):>8.0f} msg/s, "
            f"{statistics.median(r.messages / r.tasks for r in rows):.0f} messages/task, "
            f"lag p50 <= {statistics.median(r.lag_p50 for r in rows):g}s, "
            f"p99 <= {statistics.median(r.lag_p99 for r in rows):g}s"
        )


async def main_async(args: argparse.Namespace) -> int:
    from persistence import migrate

    name = f"collab_bench_{uuid.uuid4().hex[:10]}"
    await _pg(POSTGRES_URL, f'CREATE DATABASE "{name}"')
    args.database_url = (
        make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    )
    broker = (
        IsolatedBroker.on_redis(REDIS_URL, BENCH_REDIS_DB, "collab.bench")
        if args.broker == "redis"
        else IsolatedBroker.on_rabbitmq(RABBITMQ_URL, "collab.bench")
    )
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="bench-persistence-") as tmp:
        log_path = Path(tmp) / "worker.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")}
        env.update(
            {
                "COLLAB_ENV": "test",
                "COLLAB_DATABASE_URL": args.database_url,
                "COLLAB_SECRET_KEY": "bench-" + "x" * 40,
                **broker.env(),
            }
        )
        metrics_port = _free_port()
        env["COLLAB_CELERY_METRICS_PORT"] = str(metrics_port)
        worker = WorkerProcess(
            env,
            log_path,
            args.concurrency,
            name="collab-bench",
            loglevel="WARNING",  # no line per task: the unbatched runs make thousands
            ready=lambda: _answers(metrics_port),
        )
        try:
            await asyncio.to_thread(migrate.upgrade, args.database_url)
            worker.start()
            print(
                f"persistence benchmark: {platform.node()}, {os.cpu_count()} cores, "
                f"Python {platform.python_version()}; broker {args.broker}, one worker "
                f"(prefork, concurrency {args.concurrency}), PostgreSQL; "
                f"{args.in_flight} publishers, {args.rooms} rooms",
                flush=True,
            )
            plan = [("batched", args.messages)] * args.runs
            if args.reconciler:  # interleaved, so that drift on a shared machine hits both
                plan = [
                    (mode, args.messages)
                    for _ in range(args.runs)
                    for mode in ("published", "reconciled")
                ]
            elif args.unbatched_messages:
                plan += [("unbatched", args.unbatched_messages)] * args.runs
            for index, (mode, count) in enumerate(plan):
                run = (index // 2 if args.reconciler else index % args.runs) + 1
                result = await one_run(mode, run, count, args, broker, metrics_port)
                results.append(result)
                print_result(result)
        finally:
            worker.kill()
            broker.cleanup()
            await _pg(POSTGRES_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    summary(results)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.bench_persistence",
        description="Messages per second from publish to stored row, batched and unbatched.",
    )
    parser.add_argument("--messages", type=int, default=20000, help="per batched run")
    parser.add_argument(
        "--unbatched-messages",
        type=int,
        default=None,
        help="per unbatched run (default: --messages, at most 5000; 0 skips the mode)",
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--broker", choices=["redis", "amqp"], default="redis")
    parser.add_argument("--concurrency", type=int, default=2, help="worker pool processes")
    parser.add_argument(
        "--in-flight", type=int, default=5000, help="publishers, one message unacknowledged each"
    )
    parser.add_argument("--rooms", type=int, default=10)
    parser.add_argument("--timeout", type=float, default=300.0, help="per run, seconds")
    parser.add_argument(
        "--reconciler",
        action="store_true",
        help="publish through the Redis room broker first; runs with and without the reconciler",
    )
    args = parser.parse_args(argv)
    if args.unbatched_messages is None:
        args.unbatched_messages = min(args.messages, 5000)
    if args.messages < 1 or args.runs < 1 or args.in_flight < 1 or args.rooms < 1:
        parser.error("--messages, --runs, --in-flight and --rooms must be at least 1")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
