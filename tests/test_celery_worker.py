"""Persistence through Celery, end to end: a real `collab serve`, a real `collab worker`
process, a real broker (Redis or RabbitMQ) and PostgreSQL.

What these tests hold the system to (docs/PERSISTENCE.md, "The guarantee, and how it is
kept"): every acknowledged message ends up as exactly one row, with the room, offset,
epoch, sender and body it was acknowledged with, and history reads it back; killing the whole
worker with SIGKILL mid-burst, or the database refusing connections for a while, loses
nothing acknowledged and duplicates nothing.

Isolation: each test has a queue of its own (`tests/celery_brokers.py`). Worker processes are
started in their own process group and killed by that group only.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy.engine import make_url

from loadtests.isolated import IsolatedBroker, WorkerProcess
from persistence.database import create_engine, create_session_factory
from persistence.sink import DatabaseSink
from realtime.protocol import utc_timestamp
from realtime.storage import MessageSink, StoredMessage
from realtime.types import UserInfo, new_msg_id
from tests.celery_brokers import VISIBILITY_TIMEOUT
from tests.helpers import eventually
from tests.processes import ServerProcess, server_env
from tests.services import POSTGRES_URL, free_port, mysql_connect
from tests.wsclient import Client, Frame, guest

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

# --- processes -------------------------------------------------------------------------------


@dataclass
class Deployment:
    """A server and its workers sharing one broker and one PostgreSQL database."""

    folder: Path
    database_url: str
    broker: IsolatedBroker
    server_extra: dict[str, str] = field(default_factory=dict)
    worker_extra: dict[str, str] = field(default_factory=dict)
    workers: list[WorkerProcess] = field(default_factory=list)
    servers: list[ServerProcess] = field(default_factory=list)

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        return server_env(
            self.folder,
            {
                "COLLAB_DATABASE_URL": self.database_url,
                "COLLAB_AUTO_MIGRATE": "false",
                **self.broker.env(),
                **extra,
            },
        )

    def start_worker(self, **extra: str) -> WorkerProcess:
        env = self._env({"COLLAB_CELERY_RETRY_BACKOFF_MAX": "1", **self.worker_extra, **extra})
        worker = WorkerProcess(env, self.folder / f"worker-{len(self.workers) + 1}.log")
        self.workers.append(worker)
        return worker.start()

    def start_server(self) -> ServerProcess:
        env = self._env(
            {
                "COLLAB_RATE_LIMIT": "100000",
                "COLLAB_RATE_BURST": "100000",
                "COLLAB_OUTGOING_QUEUE_BYTES": str(16 * 1024 * 1024),
                **self.server_extra,
            }
        )
        server = ServerProcess(env, self.folder / "server.log")
        self.servers.append(server)
        return server.start()

    def logs(self) -> str:
        parts = [f"--- {w.log_path.name}\n{w.log()}" for w in self.workers]
        parts += [f"--- server\n{s.log()}" for s in self.servers]
        return "\n".join(parts)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()
        for worker in self.workers:
            worker.kill()  # its work is checked by now; a warm shutdown takes seconds


@pytest.fixture
def deployment(
    tmp_path: Path, postgres_database: str, celery_broker: IsolatedBroker
) -> Iterator[Deployment]:
    found = Deployment(tmp_path, postgres_database, celery_broker)
    try:
        yield found
    finally:
        found.stop()


# --- the database, read directly --------------------------------------------------------------


def admin_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def stored_rows(database_url: str, rooms: list[str]) -> list[dict[str, Any]]:
    if make_url(database_url).get_backend_name() == "mysql":
        return await _stored_rows_mysql(database_url, rooms)
    import asyncpg

    connection = await asyncpg.connect(admin_dsn(database_url))
    try:
        records = await connection.fetch(
            'SELECT msg_id, room, epoch, "offset", user_id, user_name, body::text AS body,'
            " client_msg_id FROM messages WHERE room = ANY($1::text[])",
            rooms,
        )
    finally:
        await connection.close()
    return [{**dict(r), "body": orjson.loads(r["body"])} for r in records]


async def _stored_rows_mysql(database_url: str, rooms: list[str]) -> list[dict[str, Any]]:
    import aiomysql

    connection = await mysql_connect(database_url)
    try:
        async with connection.cursor(aiomysql.DictCursor) as cursor:
            marks = ", ".join(["%s"] * len(rooms))
            await cursor.execute(
                "SELECT msg_id, room, epoch, `offset`, user_id, user_name, body, client_msg_id"
                f" FROM messages WHERE room IN ({marks})",
                rooms,
            )
            records: list[dict[str, Any]] = list(await cursor.fetchall())
    finally:
        connection.close()
    return [{**r, "body": orjson.loads(r["body"])} for r in records]


async def wait_for_rows(
    database_url: str,
    rooms: list[str],
    count: int,
    timeout: float,
    logs: Callable[[], str] = str,
) -> list[dict[str, Any]]:
    """The rooms' rows once there are `count` (and a moment later, for late duplicates)."""
    rows: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal rows
        rows = await stored_rows(database_url, rooms)
        return len(rows) >= count

    try:
        await eventually(enough, timeout, f"{count} stored rows", 0.2)
    except pytest.fail.Exception:
        print(logs())
        pytest.fail(f"{len(rows)} of {count} rows stored within {timeout}s")
    # Anything more arriving late would be a duplicate: give it a moment to show up.
    await asyncio.sleep(0.5)
    return await stored_rows(database_url, rooms)


# --- clients ---------------------------------------------------------------------------------


def room_name() -> str:
    return f"cw-{uuid.uuid4().hex[:10]}"


@dataclass
class Publisher:
    client: Client
    user: dict[str, str]
    acks: list[Frame] = field(default_factory=list)
    errors: list[Frame] = field(default_factory=list)
    sent: dict[int, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    epochs: dict[str, str] = field(default_factory=dict)

    @classmethod
    async def connect(cls, server: ServerProcess, name: str, rooms: list[str]) -> Publisher:
        token, _ = guest(server.url, name)
        client = await Client.connect(server.ws_url, token)
        publisher = cls(client, client.welcome["user"])
        for room in rooms:
            joined = await client.request({"type": "join", "room": room, "presence_events": False})
            assert joined["type"] == "joined", joined
            publisher.epochs[room] = joined["epoch"]
        return publisher

    async def publish(self, counts: dict[str, int], timeout: float = 30.0) -> None:
        """Send `counts[room]` publishes to each room without waiting, then read until each
        has its reply (one coroutine per client: a WebSocket has one reader)."""
        waiting: set[int] = set()
        for room, count in counts.items():
            for _ in range(count):
                command_id = len(self.sent) + 1
                body = {"text": f"{self.user['name']} #{command_id}", "n": command_id}
                self.sent[command_id] = (room, body)
                waiting.add(command_id)
                await self.client.send(
                    {
                        "type": "publish",
                        "id": command_id,
                        "room": room,
                        "body": body,
                        "client_msg_id": f"c-{command_id}",
                    }
                )
        deadline = asyncio.get_running_loop().time() + timeout
        while waiting:
            remaining = deadline - asyncio.get_running_loop().time()
            frame = await self.client.next_frame(max(remaining, 0.01))
            if frame.get("id") in waiting:
                waiting.discard(frame["id"])
                (self.acks if frame["type"] == "ack" else self.errors).append(frame)


def check_rows_match_acks(rows: list[dict[str, Any]], publishers: list[Publisher]) -> None:
    """Each acknowledged message is one row, with what it was acknowledged with."""
    msg_ids = [row["msg_id"] for row in rows]
    assert len(msg_ids) == len(set(msg_ids)), "a message was stored twice"
    by_id = {row["msg_id"]: row for row in rows}
    acked = 0
    for publisher in publishers:
        for ack in publisher.acks:
            acked += 1
            row = by_id.get(ack["msg_id"])
            assert row is not None, f"acknowledged message {ack} is not stored"
            room, body = publisher.sent[ack["id"]]
            assert row["room"] == room == ack["room"]
            assert row["offset"] == ack["offset"]
            assert row["epoch"] == publisher.epochs[room]
            assert (row["user_id"], row["user_name"]) == (
                publisher.user["id"],
                publisher.user["name"],
            )
            assert row["body"] == body
            assert row["client_msg_id"] == f"c-{ack['id']}"
    assert len(rows) == acked, f"{len(rows)} rows for {acked} acknowledged messages"
    for room in {row["room"] for row in rows}:
        offsets = sorted(row["offset"] for row in rows if row["room"] == room)
        assert offsets == list(range(1, len(offsets) + 1)), f"offsets of {room} have gaps"


# --- tests -----------------------------------------------------------------------------------


async def test_acknowledged_messages_become_exactly_one_row_each(deployment: Deployment) -> None:
    metrics_port = free_port()
    deployment.start_worker(COLLAB_CELERY_METRICS_PORT=str(metrics_port))
    server = deployment.start_server()
    rooms = [room_name(), room_name()]
    ann, bob, cy = [await Publisher.connect(server, n, rooms) for n in ("ann", "bob", "cy")]

    await asyncio.gather(
        ann.publish({rooms[0]: 50, rooms[1]: 25}),
        bob.publish({rooms[0]: 50, rooms[1]: 25}),
        cy.publish({rooms[0]: 50}),
    )
    publishers = [ann, bob, cy]
    assert not [e for p in publishers for e in p.errors]
    rows = await wait_for_rows(deployment.database_url, rooms, 200, 20, deployment.logs)
    check_rows_match_acks(rows, publishers)

    # History is read back from the rows the worker wrote: REST and the `history` command.
    token, _ = guest(server.url, "reader")
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http:
        page = await http.get(f"/rooms/{rooms[0]}/messages", params={"after": 0, "limit": 200})
        assert page.status_code == 200, page.text
        listed = page.json()["messages"]
    assert [m["offset"] for m in listed] == list(range(1, 151))
    expected = {
        ack["msg_id"]: (ack["offset"], p.user, p.sent[ack["id"]][1])
        for p in publishers
        for ack in p.acks
        if ack["room"] == rooms[0]
    }
    assert {m["msg_id"]: (m["offset"], m["user"], m["body"]) for m in listed} == expected
    assert {m["epoch"] for m in listed} == {ann.epochs[rooms[0]]}
    history = await ann.client.request({"type": "history", "room": rooms[1], "limit": 50})
    assert [m["offset"] for m in history["messages"]] == list(range(1, 51))
    assert history["has_more"] is False

    # The worker measured its batches and how long messages waited.
    scrape = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in scrape.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["collab_persist_lag_seconds_count"] >= 200
    assert 1 <= samples["collab_persist_batch_size_count"] <= 200
    assert samples["collab_persist_batch_size_sum"] == samples["collab_persist_lag_seconds_count"]


async def locked_messages_table(database_url: str) -> Any:
    """A transaction holding a lock that makes every INSERT into messages wait."""
    import asyncpg

    connection = await asyncpg.connect(admin_dsn(database_url))
    transaction = connection.transaction()
    await transaction.start()
    await connection.execute("LOCK TABLE messages IN SHARE ROW EXCLUSIVE MODE")
    return connection, transaction


async def inserts_waiting(database_url: str) -> int:
    """How many connections wait to insert into messages, blocked by a lock."""
    import asyncpg

    name = make_url(database_url).database
    connection = await asyncpg.connect(admin_dsn(POSTGRES_URL))
    try:
        return int(
            await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = $1"
                " AND wait_event_type = 'Lock' AND query ILIKE 'INSERT INTO messages%'",
                name,
            )
        )
    finally:
        await connection.close()


async def test_worker_killed_mid_burst_loses_and_duplicates_nothing(
    deployment: Deployment,
) -> None:
    """SIGKILL the whole worker while its batches are half-way into the database, in the
    middle of a 2,000-message burst; a new worker stores every acknowledged message once."""
    await worker_killed_mid_burst_scenario(deployment)


@pytest.mark.rabbitmq
async def test_quorum_queue_worker_killed_mid_burst_loses_and_duplicates_nothing(
    tmp_path: Path, postgres_database: str, quorum_celery_broker: IsolatedBroker
) -> None:
    """COLLAB_CELERY_QUEUE_TYPE=quorum: the queue is a quorum queue, and the same SIGKILL in
    the middle of a burst loses and duplicates nothing (RabbitMQ gives the dead worker's
    unacknowledged batches back as soon as its connection drops)."""
    deployment = Deployment(tmp_path, postgres_database, quorum_celery_broker)
    try:
        await worker_killed_mid_burst_scenario(deployment)
    finally:
        deployment.stop()
    assert queue_type(quorum_celery_broker) == "quorum"


@pytest.mark.rabbitmq
async def test_quorum_queue_retries_through_a_database_outage(
    tmp_path: Path, postgres_database: str, quorum_celery_broker: IsolatedBroker
) -> None:
    """A batch retried with a countdown on a quorum queue (no global QoS) goes through
    RabbitMQ's delayed-delivery exchanges and comes back: nothing is lost or doubled."""
    deployment = Deployment(tmp_path, postgres_database, quorum_celery_broker)
    try:
        await database_outage_scenario(deployment)
        assert "direct exchange" not in deployment.logs()
    finally:
        await set_connections_allowed(postgres_database, allowed=True)
        deployment.stop()


def queue_type(broker: IsolatedBroker) -> str:
    """The queue's type, as RabbitMQ holds it: redeclaring it with another type is refused."""
    from kombu import connection as kombu_connection

    kombu: Any = kombu_connection  # kombu has no type hints
    for candidate in ("quorum", "classic"):
        with kombu.Connection(broker.url, connect_timeout=5) as connection:
            try:
                connection.default_channel.queue_declare(
                    broker.queue,
                    durable=True,
                    auto_delete=False,
                    arguments={"x-queue-type": candidate},
                )
            except Exception:  # PRECONDITION_FAILED: not this type
                continue
            return candidate
    raise AssertionError(f"queue {broker.queue} is neither quorum nor classic")


async def worker_killed_mid_burst_scenario(deployment: Deployment) -> None:
    first = deployment.start_worker()
    server = deployment.start_server()
    rooms = [room_name(), room_name()]
    publishers = [await Publisher.connect(server, f"p{i}", rooms) for i in range(4)]

    async def burst(per_publisher: int) -> None:
        await asyncio.gather(
            *(p.publish({rooms[i % 2]: per_publisher}) for i, p in enumerate(publishers))
        )

    await burst(250)  # 1,000 acknowledged, being stored
    connection, transaction = await locked_messages_table(deployment.database_url)
    try:
        await burst(125)  # 500 more: the worker takes them and blocks inside its INSERT
        await eventually(
            lambda: _positive(inserts_waiting(deployment.database_url)),
            15,
            "the worker blocked inside a batch insert",
        )
        first.kill()
    finally:
        await transaction.rollback()
        await connection.close()
    await burst(125)  # the last 500 wait in the broker: no worker is running
    assert not [e for p in publishers for e in p.errors]
    assert sum(len(p.acks) for p in publishers) == 2000

    deployment.start_worker()
    # Redis gives the dead worker's batches back after the visibility timeout.
    rows = await wait_for_rows(
        deployment.database_url, rooms, 2000, VISIBILITY_TIMEOUT + 25, deployment.logs
    )
    check_rows_match_acks(rows, publishers)


async def _positive(count: Awaitable[int]) -> bool:
    return await count > 0


@pytest.mark.redis
async def test_database_refusing_connections_delays_but_loses_nothing(
    tmp_path: Path, postgres_database: str, redis_celery_broker: IsolatedBroker
) -> None:
    deployment = Deployment(tmp_path, postgres_database, redis_celery_broker)
    try:
        await database_outage_scenario(deployment)
    finally:
        await set_connections_allowed(postgres_database, allowed=True)
        deployment.stop()


async def set_connections_allowed(database_url: str, *, allowed: bool) -> None:
    import asyncpg

    name = make_url(database_url).database
    connection = await asyncpg.connect(admin_dsn(POSTGRES_URL))
    try:
        await connection.execute(
            f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS {"true" if allowed else "false"}'
        )
        if not allowed:
            await connection.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
    finally:
        await connection.close()


async def database_outage_scenario(deployment: Deployment) -> None:
    worker = deployment.start_worker()
    server = deployment.start_server()
    rooms = [room_name(), room_name()]
    publishers = [await Publisher.connect(server, f"p{i}", rooms) for i in range(3)]
    await asyncio.gather(*(p.publish({rooms[i % 2]: 50}) for i, p in enumerate(publishers)))
    await wait_for_rows(deployment.database_url, rooms, 150, 15, deployment.logs)

    await set_connections_allowed(deployment.database_url, allowed=False)
    try:
        # Acknowledged while the database is away: the batches wait in the broker.
        await asyncio.gather(*(p.publish({rooms[i % 2]: 300}) for i, p in enumerate(publishers)))
        assert not [e for p in publishers for e in p.errors]

        async def retrying() -> bool:
            return worker.log().count("Retry in") >= 3

        await eventually(retrying, 15, "the worker retrying while the database is away")
        await asyncio.sleep(3)  # away for a while, not just for a moment
    finally:
        await set_connections_allowed(deployment.database_url, allowed=True)

    rows = await wait_for_rows(deployment.database_url, rooms, 1050, 20, deployment.logs)
    check_rows_match_acks(rows, publishers)


@pytest.mark.parametrize("kind", ["embedded", pytest.param("celery", marks=pytest.mark.redis)])
async def test_both_sinks_store_the_same_batches_once(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, postgres_database: str
) -> None:
    """The in-process sink and the Celery sink store what they are given, once, even when the
    same messages are given twice (a publisher's retry)."""
    from collab.realtime_wiring import build_sink
    from tests.conftest import make_settings

    overrides: dict[str, object] = {"persist_batch_size": 40, "persist_batch_delay": 0.01}
    deployment: Deployment | None = None
    if kind == "celery":
        broker: IsolatedBroker = request.getfixturevalue("redis_celery_broker")
        deployment = Deployment(tmp_path, postgres_database, broker)
        deployment.start_worker()
        overrides.update(
            celery_broker_url=broker.url,
            celery_queue=broker.queue,
            celery_broker_transport_options=broker.options,
        )
    engine = create_engine(postgres_database)
    sink: MessageSink = build_sink(
        make_settings(postgres_database, **overrides), create_session_factory(engine)
    )
    assert isinstance(sink, DatabaseSink) == (kind == "embedded")
    room = room_name()
    user = UserInfo("7", "ann")
    messages = [
        StoredMessage(new_msg_id(), room, "ep1", n, user, {"n": n}, f"c{n}", utc_timestamp())
        for n in range(1, 101)
    ]
    await sink.start()
    try:
        await asyncio.gather(*(sink.store(m) for m in messages))
        await asyncio.gather(*(sink.store(m) for m in messages[:30]))
        rows = await wait_for_rows(
            postgres_database, [room], 100, 15, deployment.logs if deployment else str
        )
    finally:
        await sink.close()
        await engine.dispose()
        if deployment is not None:
            deployment.stop()
    assert sorted((r["offset"], r["msg_id"]) for r in rows) == [
        (m.offset, m.msg_id) for m in messages
    ]
    assert all(r["body"] == {"n": r["offset"]} and r["user_id"] == "7" for r in rows)
