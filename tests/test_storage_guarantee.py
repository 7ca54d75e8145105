"""No acknowledged message lost on any broker: the guarantee attacked where it breaks.

kombu's Redis transport takes a Celery message with BRPOP and records it as unacknowledged in
a separate step (kombu #305, celery #7950): a worker killed between the two loses the batch,
and no visibility timeout brings it back. These tests kill real `collab worker` processes at
every point of the path (idle in BRPOP, as a burst starts, blocked inside an INSERT, right
after a commit), five times each, on Redis and on RabbitMQ, and hold the system to its promise
end to end: every acknowledged message is stored exactly once, because the reconciler finds
what the broker lost in the room's window and stores it again; `collab storage check` agrees.
They also take the database away for 30 s under load, crash the Celery broker's Redis, feed
storage rows it refuses, and make a gap the window can no longer close, which must be
reported, never skipped.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Awaitable, Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from loadtests.isolated import IsolatedBroker
from persistence.database import create_engine, create_session_factory
from persistence.sink import DatabaseSink
from realtime.protocol import utc_timestamp
from realtime.storage import MessageRefused, StoredMessage
from realtime.types import UserInfo, new_msg_id
from tests.celery_brokers import VISIBILITY_TIMEOUT
from tests.helpers import eventually
from tests.processes import RedisServer, ServerProcess, require_redis_server
from tests.test_celery_worker import (
    Deployment,
    Publisher,
    admin_dsn,
    check_rows_match_acks,
    inserts_waiting,
    locked_messages_table,
    room_name,
    set_connections_allowed,
    stored_rows,
    wait_for_rows,
)
from tests.wsclient import Client

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]

GRACE = 2.0  # the reconciler's grace period in these tests (seconds)
# The window is far smaller than a burst, so a lost first batch would have left it long ago
# were it not kept until confirmed stored.
WINDOW = 100
BURST = 600
REPETITIONS = 5


def reconciling(redis_url: str, **extra: str) -> dict[str, str]:
    """Server settings: rooms on Redis, a reconciler that acts within seconds."""
    return {
        "COLLAB_BROKER_URL": redis_url,
        "COLLAB_RECONCILE_GRACE": str(GRACE),
        "COLLAB_RECONCILE_INTERVAL": "0.5",
        "COLLAB_HISTORY_WINDOW": str(WINDOW),
        **extra,
    }


@pytest.fixture
def guarded(
    tmp_path: Path, postgres_database: str, celery_broker: IsolatedBroker, redis_url: str
) -> Iterator[Deployment]:
    found = Deployment(tmp_path, postgres_database, celery_broker, reconciling(redis_url))
    try:
        yield found
    finally:
        found.stop()


def storage_check(deployment: Deployment, *args: str) -> subprocess.CompletedProcess[str]:
    """`collab storage check` as an operator runs it, with the server's settings."""
    env = deployment._env(deployment.server_extra)  # the server's own settings
    return subprocess.run(
        [sys.executable, "-m", "collab", "storage", "check", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def stored_count(database_url: str, room: str) -> int:
    return len(await stored_rows(database_url, [room]))


async def wait_all_stored(deployment: Deployment, publisher: Publisher, room: str) -> None:
    acked = [a for a in publisher.acks if a["room"] == room]
    # The reconciler needs its grace and a pass or two; Redis's own restore needs the
    # visibility timeout. Either may come first; both together must not store twice.
    await wait_for_rows(
        deployment.database_url, [room], len(acked), GRACE + VISIBILITY_TIMEOUT + 60,
        deployment.logs,
    )  # fmt: skip


async def send_burst(publisher: Publisher, room: str, count: int) -> set[int]:
    """Send `count` publishes without reading any reply; their command ids."""
    ids: set[int] = set()
    for _ in range(count):
        command_id = len(publisher.sent) + 1
        body = {"text": f"{publisher.user['name']} #{command_id}", "n": command_id}
        publisher.sent[command_id] = (room, body)
        ids.add(command_id)
        await publisher.client.send(
            {
                "type": "publish",
                "id": command_id,
                "room": room,
                "body": body,
                "client_msg_id": f"c-{command_id}",
            }
        )
    return ids


async def read_replies(publisher: Publisher, waiting: set[int], timeout: float = 60) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while waiting:
        remaining = deadline - asyncio.get_running_loop().time()
        frame = await publisher.client.next_frame(max(remaining, 0.01))
        if frame.get("id") in waiting:
            waiting.discard(frame["id"])
            (publisher.acks if frame["type"] == "ack" else publisher.errors).append(frame)


async def join(publisher: Publisher, room: str) -> None:
    joined = await publisher.client.request(
        {"type": "join", "room": room, "presence_events": False}
    )
    assert joined["type"] == "joined", joined
    publisher.epochs[room] = joined["epoch"]


@pytest.mark.parametrize("point", ["idle", "burst-start", "mid-insert", "after-commit"])
async def test_worker_killed_anywhere_loses_nothing_acknowledged(
    guarded: Deployment, point: str
) -> None:
    """The scenario of issue 9, at four kill points, five times each."""
    worker = guarded.start_worker()
    server = guarded.start_server()
    publisher = await Publisher.connect(server, "ann", [])
    rooms: list[str] = []
    for _ in range(REPETITIONS):
        room = room_name()
        rooms.append(room)
        await join(publisher, room)
        if point == "idle":
            worker.kill()  # waiting in BRPOP (or basic.consume) with nothing to do
            await read_replies(publisher, await send_burst(publisher, room, BURST))
        elif point == "burst-start":
            waiting = await send_burst(publisher, room, BURST)
            await asyncio.sleep(0.01)  # the first batches are on their way to the worker
            worker.kill()
            await read_replies(publisher, waiting)
        elif point == "mid-insert":
            connection, transaction = await locked_messages_table(guarded.database_url)
            try:
                await read_replies(publisher, await send_burst(publisher, room, BURST))
                await eventually(
                    lambda: _positive(inserts_waiting(guarded.database_url)),
                    15,
                    "the worker blocked inside a batch insert",
                )
                worker.kill()
            finally:
                await transaction.rollback()
                await connection.close()
        else:
            waiting = await send_burst(publisher, room, BURST)

            def first_batch_stored(room: str = room) -> Awaitable[bool]:
                return _positive(stored_count(guarded.database_url, room))

            await eventually(
                first_batch_stored,
                15,
                "the first batch committed",
                0.005,
            )
            worker.kill()
            await read_replies(publisher, waiting)
        assert not publisher.errors, publisher.errors[:3]
        worker = guarded.start_worker()
        await wait_all_stored(guarded, publisher, room)
    rows = await stored_rows(guarded.database_url, rooms)
    check_rows_match_acks(rows, [publisher])
    assert len(rows) == REPETITIONS * BURST

    result = storage_check(guarded, *(arg for room in rooms for arg in ("--room", room)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{REPETITIONS} rooms checked: 0 gaps" in result.stdout


@pytest.mark.mysql
@pytest.mark.parametrize("celery_broker", ["redis"], indirect=True)
@pytest.mark.parametrize("point", ["burst-start", "after-commit"])
async def test_on_mariadb_a_killed_worker_loses_and_duplicates_nothing(
    tmp_path: Path, mysql_database: str, celery_broker: IsolatedBroker, redis_url: str, point: str
) -> None:
    """The same kills with MariaDB/MySQL storing: there a redelivered batch meets `INSERT
    IGNORE`, whose warnings must count a taken msg_id as stored (never as a refusal to set
    aside), while the reconciler stores what the broker lost. Every ack is one row."""
    deployment = Deployment(tmp_path, mysql_database, celery_broker, reconciling(redis_url))
    try:
        worker = deployment.start_worker()
        server = deployment.start_server()
        publisher = await Publisher.connect(server, "ann", [])
        rooms: list[str] = []
        for _ in range(3):
            room = room_name()
            rooms.append(room)
            await join(publisher, room)
            waiting = await send_burst(publisher, room, BURST)
            if point == "burst-start":
                await asyncio.sleep(0.01)
            else:

                def first_batch_stored(room: str = room) -> Awaitable[bool]:
                    return _positive(stored_count(deployment.database_url, room))

                await eventually(first_batch_stored, 15, "the first batch committed", 0.005)
            worker.kill()
            await read_replies(publisher, waiting)
            assert not publisher.errors, publisher.errors[:3]
            worker = deployment.start_worker()
            await wait_all_stored(deployment, publisher, room)
        # What the last killed worker held comes back after the visibility timeout, into
        # rows the reconciler may have stored meanwhile: let it land before counting.
        await asyncio.sleep(VISIBILITY_TIMEOUT + 2)
        rows = await stored_rows(deployment.database_url, rooms)
        check_rows_match_acks(rows, [publisher])
        assert await set_aside_count(deployment.database_url, rooms) == 0
    finally:
        deployment.stop()


async def set_aside_count(database_url: str, rooms: list[str]) -> int:
    """Rows set aside for the rooms, on any database SQLAlchemy reaches."""
    from sqlalchemy import bindparam, text

    engine = create_engine(database_url)
    try:
        async with engine.connect() as connection:
            query = text("SELECT count(*) FROM set_aside_messages WHERE room IN :rooms")
            query = query.bindparams(bindparam("rooms", expanding=True))
            result = await connection.execute(query, {"rooms": rooms})
            return int(result.scalar_one())
    finally:
        await engine.dispose()


async def _positive(count: Any) -> bool:
    return bool(await count > 0)


def metric(server: ServerProcess, name: str) -> float:
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split(" ")[1])
    raise AssertionError(f"{name} not in /metrics")


@pytest.mark.parametrize("celery_broker", ["redis"], indirect=True)
async def test_a_gap_the_window_no_longer_holds_is_reported(guarded: Deployment) -> None:
    """Messages acknowledged into the Celery queue, then the queue lost (a broker that forgot
    them) with more of them than the window may keep: the reconciler stores what the window
    still has, counts the rest as lost, and `collab storage check` reports it and exits 1."""
    guarded.server_extra.update({"COLLAB_HISTORY_WINDOW": "5", "COLLAB_MAX_UNCONFIRMED": "10"})
    server = guarded.start_server()  # no worker: the batches stay in the queue
    room = room_name()
    publisher = await Publisher.connect(server, "ann", [room])
    await publisher.publish({room: 30})
    assert len(publisher.acks) == 30 and not publisher.errors
    import redis

    client = redis.Redis.from_url(guarded.broker.url)
    try:  # the broker loses every queued batch
        keys = list(client.scan_iter(match=f"{guarded.broker.options['global_keyprefix']}*"))
        assert keys
        client.delete(*keys)
    finally:
        client.close()
    guarded.start_worker()

    async def settled() -> bool:
        # Both, in any order: a pass covers at most `max_per_pass` offsets, so the lost ones
        # can be counted a pass before the last of the window's ones are stored again.
        return (
            metric(server, "collab_storage_lost_total") == 20
            and metric(server, "collab_storage_restored_total") == 10
        )

    await eventually(settled, GRACE + 20, "the reconciler storing 10 again and counting 20 lost")
    rows = await stored_rows(guarded.database_url, [room])
    assert sorted(r["offset"] for r in rows) == list(range(21, 31))
    assert "are lost" in server.log()

    result = storage_check(guarded, "--room", room)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"GAP room {room}" in result.stdout and "offsets 1-20" in result.stdout
    assert "lost" in result.stdout
    repaired = storage_check(guarded, "--room", room, "--repair")
    assert repaired.returncode == 1  # nothing left to repair it with
    assert storage_check(guarded, "--room", room_name()).returncode == 0


@pytest.mark.parametrize("celery_broker", ["redis"], indirect=True)
async def test_database_away_30s_under_load_loses_and_duplicates_nothing(
    guarded: Deployment,
) -> None:
    guarded.start_worker()
    server = guarded.start_server()
    rooms = [room_name(), room_name()]
    publishers = [await Publisher.connect(server, f"p{i}", rooms) for i in range(2)]
    await asyncio.gather(*(p.publish({rooms[i]: 50}) for i, p in enumerate(publishers)))

    async def load(seconds: float) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while loop.time() < end:
            await asyncio.gather(*(p.publish({rooms[i]: 20}) for i, p in enumerate(publishers)))
            await asyncio.sleep(0.1)

    await set_connections_allowed(guarded.database_url, allowed=False)
    try:
        await load(30.0)  # the workers retry, the reconciler fails its passes, acks go on
    finally:
        await set_connections_allowed(guarded.database_url, allowed=True)
    await load(2.0)
    assert not [e for p in publishers for e in p.errors]
    acked = sum(len(p.acks) for p in publishers)
    rows = await wait_for_rows(guarded.database_url, rooms, acked, 90, guarded.logs)
    check_rows_match_acks(rows, publishers)
    result = storage_check(guarded, "--room", rooms[0], "--room", rooms[1])
    assert result.returncode == 0, result.stdout + result.stderr


async def test_celery_broker_redis_crash_under_load_loses_nothing_delivered(
    tmp_path: Path, postgres_database: str, redis_url: str
) -> None:
    """The Celery broker's Redis (AOF, fsync always) SIGKILLed and restarted while a room is
    busy. Publishes while it is down are delivered but not confirmed: they answer with
    `outcome: "unknown"`, and the reconciler stores them. Every delivered message ends up
    stored once, acknowledged or not."""
    require_redis_server()
    celery_redis = RedisServer(tmp_path, persistent=True)
    celery_redis.start()
    broker = IsolatedBroker.on_redis(
        celery_redis.url, 0, "collab.crash", visibility_timeout=VISIBILITY_TIMEOUT,
        unacked_restore_interval=1,
    )  # fmt: skip
    deployment = Deployment(
        tmp_path, postgres_database, broker, reconciling(redis_url, COLLAB_CELERY_SEND_TIMEOUT="2")
    )
    try:
        deployment.start_worker()
        server = deployment.start_server()
        room = room_name()
        publisher = await Publisher.connect(server, "ann", [room])
        watcher = await Client.connect(server.ws_url, (await _token(server, "watcher")))
        await watcher.request({"type": "join", "room": room, "presence_events": False})
        await publisher.publish({room: 200})
        celery_redis.kill()
        down = asyncio.ensure_future(publisher.publish({room: 100}, timeout=60))
        await asyncio.sleep(2.0)
        celery_redis.start()
        await down
        await publisher.publish({room: 200}, timeout=60)
        unknown = [e for e in publisher.errors if e.get("outcome") == "unknown"]
        assert unknown, "no publish met the broker down"
        assert len(unknown) == len(publisher.errors)
        assert all(e["code"] == "unavailable" and e["room"] == room for e in unknown)
        delivered = await _messages_seen(watcher, room, 500)
        assert [m["offset"] for m in delivered] == list(range(1, 501))
        rows = await wait_for_rows(deployment.database_url, [room], 500, 90, deployment.logs)
        by_offset = {r["offset"]: r for r in rows}
        assert len(rows) == 500 and sorted(by_offset) == list(range(1, 501))
        for message in delivered:
            row = by_offset[message["offset"]]
            assert (row["msg_id"], row["body"]) == (message["msg_id"], message["body"])
        for error in unknown:  # the reply named where the message is
            assert by_offset[error["offset"]]["msg_id"] == error["msg_id"]
    finally:
        deployment.stop()
        celery_redis.kill()


async def _token(server: ServerProcess, name: str) -> str:
    from tests.wsclient import guest

    token, _ = guest(server.url, name)
    return token


async def _messages_seen(client: Client, room: str, count: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while len(seen) < count:
        frame = await client.next_frame(30)
        if frame.get("type") == "message" and frame.get("room") == room:
            seen.append(frame)
    return seen


# --- rows the database refuses -------------------------------------------------------------


async def test_control_characters_in_client_msg_id_are_refused_at_the_door(
    tmp_path: Path, redis_url: str
) -> None:
    from tests.processes import server_env

    server = ServerProcess(server_env(tmp_path), tmp_path / "server.log").start()
    try:
        publisher = await Publisher.connect(server, "ann", [room := room_name()])
        for bad in ("a\x00b", "tab\there", "del\x7f", "c1\x85"):
            reply = await publisher.client.request(
                {"type": "publish", "room": room, "body": {"t": 1}, "client_msg_id": bad}
            )
            assert reply["type"] == "error" and reply["code"] == "bad_request", reply
            assert "control characters" in reply["message"]
        ok = await publisher.client.request(
            {"type": "publish", "room": room, "body": {"t": 2}, "client_msg_id": "fine-ü"}
        )
        assert ok["type"] == "ack" and ok["offset"] == 1
    finally:
        server.stop()


def _batch(room: str, count: int, bad_at: int) -> list[StoredMessage]:
    user = UserInfo("7", "ann")
    return [
        StoredMessage(
            new_msg_id(),
            room,
            "ep1",
            n,
            user,
            {"n": n},
            "bad\x00id" if n == bad_at else f"c{n}",
            utc_timestamp(),
        )
        for n in range(1, count + 1)
    ]


async def set_aside_rows(database_url: str, room: str) -> list[dict[str, Any]]:
    import asyncpg

    connection = await asyncpg.connect(admin_dsn(database_url))
    try:
        records = await connection.fetch(
            'SELECT msg_id, "offset", reason, message FROM set_aside_messages WHERE room = $1',
            room,
        )
    finally:
        await connection.close()
    return [dict(r) for r in records]


async def test_a_refused_row_is_set_aside_and_its_batch_stored_embedded(
    postgres_database: str,
) -> None:
    """A message PostgreSQL refuses (NUL in text: SQLSTATE 22021, which asyncpg raises as a
    plain DBAPIError) among ordinary ones, in the in-process sink: the others are stored, the
    one is set aside with the reason, and its publisher is told."""
    engine = create_engine(postgres_database)
    sink = DatabaseSink(create_session_factory(engine), max_batch=50, max_delay=0.05)
    room = room_name()
    messages = _batch(room, 21, bad_at=1)
    await sink.start()
    try:
        results = await asyncio.gather(*(sink.store(m) for m in messages), return_exceptions=True)
    finally:
        await sink.close()
        await engine.dispose()
    assert isinstance(results[0], MessageRefused) and "22021" in str(results[0])
    assert results[1:] == [None] * 20
    assert sink.healthy
    rows = await stored_rows(postgres_database, [room])
    assert sorted(r["offset"] for r in rows) == list(range(2, 22))
    aside = await set_aside_rows(postgres_database, room)
    assert [(a["offset"], a["msg_id"]) for a in aside] == [(1, messages[0].msg_id)]
    assert orjson.loads(aside[0]["message"])["client_msg_id"] == "bad\x00id"


async def test_a_refused_row_is_set_aside_and_its_batch_stored_by_a_worker(
    tmp_path: Path, postgres_database: str, celery_broker: IsolatedBroker
) -> None:
    """The same through Celery: a batch with one refused row, sent as the server sends it,
    is stored but for that row, on both brokers, without retrying for ever."""
    from collab.realtime_wiring import build_sink
    from tests.conftest import make_settings

    deployment = Deployment(tmp_path, postgres_database, celery_broker)
    worker = deployment.start_worker()
    engine = create_engine(postgres_database)
    settings = make_settings(
        postgres_database,
        celery_broker_url=celery_broker.url,
        celery_queue=celery_broker.queue,
        celery_broker_transport_options=celery_broker.options,
        persist_batch_delay=0.05,
    )
    sink = build_sink(settings, create_session_factory(engine))
    room = room_name()
    messages = _batch(room, 21, bad_at=1)
    await sink.start()
    try:
        await asyncio.gather(*(sink.store(m) for m in messages))
        rows = await wait_for_rows(postgres_database, [room], 20, 30, deployment.logs)
    finally:
        await sink.close()
        await engine.dispose()
        deployment.stop()
    assert sorted(r["offset"] for r in rows) == list(range(2, 22))
    aside = await set_aside_rows(postgres_database, room)
    assert [a["offset"] for a in aside] == [1] and "22021" in aside[0]["reason"]
    assert "Retry in" not in worker.log()
