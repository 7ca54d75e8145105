"""Buffers a stranger can grow are bounded (issue 15, Medium, "unbounded buffers").

- Frames that arrive for a member between its join and its `joined` reply are held for it
  (so nothing is lost or sent before the reply). While a backend answers slowly, a busy room
  grew that list without limit. Now it is bounded by the outgoing queue's bytes: past it the
  member is closed with 4408 and recovers on reconnect, and /metrics counts it.
- A channel recovering a gap in its stream holds what arrives meanwhile; bounded too
  (COLLAB_RECOVERY_BACKLOG_BYTES): past it its members are sent to recover (1011).

End to end, the slow backend is PostgreSQL with the messages table locked by the test: the
joiner's recovery read waits on the lock while another member publishes.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from sqlalchemy.engine import make_url

from realtime.broker import Publication
from realtime.connection import Connection
from realtime.hub import Hub
from realtime.protocol import CloseCode
from realtime.types import Position, UserInfo
from tests.processes import ServerProcess, server_env
from tests.wsclient import Client, guest_token

QUEUE_BYTES = 65536


@pytest.mark.slow
@pytest.mark.postgres
async def test_a_joiner_that_would_hold_too_much_is_closed_4408_and_recovers(
    tmp_path: Path, postgres_database: str
) -> None:
    env = server_env(
        tmp_path,
        {
            "COLLAB_DATABASE_URL": postgres_database,
            "COLLAB_OUTGOING_QUEUE_BYTES": str(QUEUE_BYTES),
            "COLLAB_HISTORY_WINDOW": "1",  # recovery past one message reads the database
            # ... once the window may let go of what it holds: when the reconciler has
            # confirmed it stored (at once here).
            "COLLAB_RECONCILE_GRACE": "0",
            "COLLAB_RECONCILE_INTERVAL": "0.1",
            "COLLAB_RATE_LIMIT": "10000",
            "COLLAB_RATE_BURST": "10000",
        },
    )
    node = ServerProcess(env, tmp_path / "server.log").start()
    dsn = make_url(postgres_database).set(drivername="postgresql")
    lock = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        room = f"buf-{uuid.uuid4().hex[:8]}"
        writer = await Client.connect(node.ws_url, guest_token(node.url, "writer"))
        joined = await writer.request({"type": "join", "room": room})
        for i in range(3):
            ack = await writer.request({"type": "publish", "room": room, "body": {"n": i}})
            assert ack["type"] == "ack"
        since = {"epoch": joined["epoch"], "offset": 0}
        for _ in range(200):
            if "collab_storage_verified_total 3.0" in httpx.get(f"{node.url}/metrics").text:
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the reconciler never confirmed the first messages stored")

        transaction = lock.transaction()
        await transaction.start()
        await lock.execute("LOCK TABLE messages IN ACCESS EXCLUSIVE MODE")
        joiner = await Client.connect(node.ws_url, guest_token(node.url, "joiner"))
        await joiner.send({"type": "join", "id": 1, "room": room, "since": since})
        # Until the joiner's recovery read waits on the lock (its frames are held from now).
        for _ in range(500):
            waiting = await lock.fetchval(
                "SELECT count(*) FROM pg_locks WHERE NOT granted "
                "AND relation = 'messages'::regclass"
            )
            if waiting:
                break
            await asyncio.sleep(0.02)
        assert waiting, "the join never reached the database"
        for _ in range(10):  # 150 KB for the joiner to hold: over the 64 KiB bound
            await writer.send({"type": "publish", "room": room, "body": {"pad": "z" * 15_000}})
        # Closed while its reply is still waiting on the database: nothing grows meanwhile.
        assert await joiner.closed_with(timeout=20) == 4408
        await transaction.commit()

        metrics = httpx.get(f"{node.url}/metrics", timeout=5).text
        assert "collab_join_buffer_overflows_total 1.0" in metrics
        for _ in range(10):
            assert (await writer.event("message", room=room))["room"] == room
        acks = [await writer.wait_for(lambda f: f.get("type") == "ack") for _ in range(10)]
        assert [a["offset"] for a in acks] == list(range(4, 14))
        # On reconnect it recovers what it has not seen: more than one reply of this small
        # queue holds, so `recovered: false` and history, page by page, has every message.
        again = await Client.connect(node.ws_url, guest_token(node.url, "joiner"))
        rejoined = await again.request({"type": "join", "room": room, "since": since})
        assert rejoined["type"] == "joined" and rejoined["recovered"] is False
        seen: list[int] = []
        page: dict[str, Any] = {"has_more": True}
        while page["has_more"]:
            before = {"before": seen[0]} if seen else {}
            page = await again.request({"type": "history", "room": room, **before})
            seen = [m["offset"] for m in page["messages"]] + seen
        assert seen == list(range(1, 14))
    finally:
        if not lock.is_closed():
            await lock.close()
        node.stop()


# -- in-process: the hub's two buffers -----------------------------------------------------


class QuietBroker:
    """What the hub calls here; the test plays the pub/sub itself."""

    async def subscribe(self, channel: str) -> None:
        return None

    async def unsubscribe(self, channel: str) -> None:
        return None

    async def recent(self, channel: str, since: Position) -> list[Publication] | None:
        await asyncio.Event().wait()  # never answers: the channel stays recovering
        return None


def connection(name: str, closes: list[int]) -> Connection:
    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "websocket.close":
            closes.append(event["code"])

    return Connection(name, UserInfo(name, name), send, max_queue_bytes=1 << 20, rate=1, burst=1)


def publication(channel: str, offset: int, size: int) -> Publication:
    frame = orjson.dumps({"type": "message", "offset": offset, "pad": "p" * size})
    return Publication(channel, "e1", offset, frame)


async def test_held_frames_of_a_joining_member_are_bounded() -> None:
    hub = Hub(QuietBroker(), max_pending_bytes=10_000)  # type: ignore[arg-type]
    closes: list[int] = []
    old, new = connection("old", []), connection("new", closes)
    await hub.add_member("room:r", old)
    hub.activate("room:r", old, Position("e1", 0))
    member = await hub.add_member("room:r", new)  # pending until activate
    for offset in range(1, 4):
        hub.on_publication(publication("room:r", offset, 3000))
    assert member.pending is not None and member.pending_bytes > 9000
    assert not new.closing
    hub.on_publication(publication("room:r", 4, 3000))
    await asyncio.sleep(0)
    assert new.closing and new.close_code == CloseCode.TOO_SLOW
    assert member.pending == [] and hub.pending_overflows == 1
    hub.on_publication(publication("room:r", 5, 3000))
    assert member.pending == [], "nothing more is held for a member being closed"
    assert not old.closing
    await asyncio.sleep(0.01)
    assert closes == [4408]
    await hub.close()


async def test_a_recovering_channels_backlog_is_bounded() -> None:
    hub = Hub(QuietBroker(), max_backlog_bytes=20_000)  # type: ignore[arg-type]
    closes: list[int] = []
    conn = connection("m", closes)
    await hub.add_member("room:r", conn)
    hub.activate("room:r", conn, Position("e1", 0))
    hub.on_publication(publication("room:r", 1, 100))
    hub.on_publication(publication("room:r", 3, 3000))  # a gap: the channel starts recovering
    await asyncio.sleep(0)
    channel = hub.channels["room:r"]
    assert channel.recovering
    for offset in range(4, 9):
        hub.on_publication(publication("room:r", offset, 3000))
    assert channel.backlog_bytes <= 20_000 and not conn.closing
    for offset in range(9, 12):
        hub.on_publication(publication("room:r", offset, 3000))
    assert hub.backlog_overflows == 1
    assert conn.closing and conn.close_code == CloseCode.INTERNAL_ERROR
    assert channel.backlog_bytes <= 20_000
    await hub.close()
