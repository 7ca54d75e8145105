"""One reply never passes the outgoing bound (issue 15, "one reply can blow the 1 MiB bound").

A reply is written while the socket is writable, so before this fix an items snapshot, a
join's recovery or a history page went out whole: 100 items of 60 KB made one 6 MB frame.
Each reply is now cut to `COLLAB_MAX_REPLY_BYTES` (default 512 KiB): a snapshot keeps the
newest items and says `snapshot_truncated`, a history page keeps the newest messages and
says `has_more`, and a recovery too large for one reply answers `recovered: false` (the
client pages through history instead).
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from realtime import protocol as p
from realtime.broker_memory import MemoryBroker
from realtime.connection import Connection
from realtime.node import Node
from realtime.presence_memory import MemoryPresence
from realtime.types import UserInfo
from tests.processes import ServerProcess, server_env
from tests.security.test_realtime_channel_cap import CountingAccess, NoHistory, NoSink
from tests.wsclient import Client, guest_token

pytestmark = pytest.mark.slow

REPLY_BOUND = 512 * 1024  # COLLAB_MAX_REPLY_BYTES's default
QUEUE_BOUND = 1024 * 1024  # COLLAB_OUTGOING_QUEUE_BYTES's default


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("reply-bounds")
    env = server_env(folder, {"COLLAB_RATE_LIMIT": "10000", "COLLAB_RATE_BURST": "10000"})
    node = ServerProcess(env, folder / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


async def raw_reply(client: Client, command: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """The reply to `command` and its size on the wire (frames before it are skipped)."""
    await client.send(command)
    while True:
        raw = await client.ws.recv()
        frame: dict[str, Any] = orjson.loads(raw)
        if frame.get("id") == command["id"]:
            return len(raw), frame


async def test_items_snapshot_is_cut_to_one_reply_and_keeps_the_newest(
    server: ServerProcess,
) -> None:
    token = guest_token(server.url, "filler")
    headers = {"Authorization": f"Bearer {token}"}
    created = []
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        for i in range(100):
            response = http.post(
                "/items", json={"title": f"big {i}", "data": {"pad": "x" * 60_000}}
            )
            assert response.status_code == 201, response.text
            created.append(response.json()["id"])

    dashboard = await Client.connect(server.ws_url, guest_token(server.url, "dash"), "/ws/live")
    size, reply = await raw_reply(dashboard, {"type": "subscribe", "id": 1, "feed": "items"})
    assert reply["type"] == "subscribed"
    assert size <= REPLY_BOUND, f"a {size}-byte snapshot in one reply"
    assert reply["snapshot_truncated"] is True
    ids = [item["id"] for item in reply["snapshot"]]
    # The newest items, in creation order, ending with the last one made.
    assert ids and ids == created[-len(ids) :]

    # A repeat subscribe answers the same (cached) snapshot, just as bounded.
    size_again, again = await raw_reply(dashboard, {"type": "subscribe", "id": 2, "feed": "items"})
    assert size_again <= REPLY_BOUND
    assert [item["id"] for item in again["snapshot"]] == ids

    # A change to the items shows in the next snapshot at once (the cache is invalidated).
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as http:
        newest = http.post("/items", json={"title": "newest"}).json()["id"]
    _, third = await raw_reply(dashboard, {"type": "subscribe", "id": 3, "feed": "items"})
    assert third["snapshot"][-1]["id"] == newest


async def test_a_client_that_asks_and_never_reads_is_closed_4408(server: ServerProcess) -> None:
    """Replies count against the outgoing bound: repeat subscribes from a client that reads
    nothing end in 4408, not in the node holding one snapshot per command."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", server.port))
    greedy = await Client.connect(
        server.ws_url, guest_token(server.url, "greedy"), "/ws/live", max_queue=1, sock=sock
    )
    for i in range(40):  # 40 snapshots of up to 512 KiB: far over 1 MiB
        await greedy.send({"type": "subscribe", "id": i, "feed": "items"})
    assert await greedy.closed_with(timeout=30) == 4408


def message_body(i: int) -> dict[str, Any]:
    return {"n": i, "pad": "y" * 15_000}


async def test_history_pages_and_recovery_are_cut_to_one_reply(server: ServerProcess) -> None:
    room = f"big-{uuid.uuid4().hex[:8]}"
    writer = await Client.connect(server.ws_url, guest_token(server.url, "writer"))
    joined = await writer.request({"type": "join", "room": room})
    for i in range(80):  # 80 x 15 KB: 1.2 MB of messages, more than one reply may hold
        ack = await writer.request({"type": "publish", "room": room, "body": message_body(i)})
        assert ack["type"] == "ack", ack

    reader = await Client.connect(server.ws_url, guest_token(server.url, "reader"))
    size, page = await raw_reply(reader, {"type": "history", "id": 1, "room": room, "limit": 200})
    assert size <= REPLY_BOUND, f"a {size}-byte history page"
    offsets = [m["offset"] for m in page["messages"]]
    assert page["has_more"] is True
    assert offsets == list(range(offsets[0], 81)), "the newest messages, in order, no gaps"
    # The rest comes page by page with `before`, each bounded, until nothing is left.
    seen = offsets
    while page["has_more"]:
        size, page = await raw_reply(
            reader,
            {"type": "history", "id": 2, "room": room, "limit": 200, "before": seen[0]},
        )
        assert size <= REPLY_BOUND
        seen = [m["offset"] for m in page["messages"]] + seen
    assert seen == list(range(1, 81))

    # Recovery of everything would not fit one reply: recovered false, nothing in missed.
    since = {"epoch": joined["epoch"], "offset": 0}
    size, rejoined = await raw_reply(
        reader, {"type": "join", "id": 3, "room": room, "since": since}
    )
    assert size <= QUEUE_BOUND
    assert rejoined["recovered"] is False and rejoined["missed"] == []
    # A short gap still recovers exactly.
    again = await Client.connect(server.ws_url, guest_token(server.url, "again"))
    recent = await again.request(
        {"type": "join", "room": room, "since": {"epoch": joined["epoch"], "offset": 77}}
    )
    assert recent["recovered"] is True
    assert [m["offset"] for m in recent["missed"]] == [78, 79, 80]


async def test_presence_of_a_big_room_is_cut_to_one_reply(tmp_path: Path) -> None:
    """A room of thousands would make every `joined` pass the bound (and, counted against
    the queue, close every joiner with 4408). Shown small: a 4 KiB reply bound, 40 members
    with long names."""
    env = server_env(
        tmp_path,
        {
            "COLLAB_MAX_REPLY_BYTES": "4096",
            "COLLAB_MAX_BODY_BYTES": "1024",
            "COLLAB_RATE_LIMIT": "10000",
            "COLLAB_RATE_BURST": "10000",
        },
    )
    node = ServerProcess(env, tmp_path / "server.log").start()
    members: list[Client] = []
    try:
        room = f"crowd-{uuid.uuid4().hex[:8]}"
        for i in range(40):
            name = f"member-{i:02d}-" + "x" * 50
            member = await Client.connect(node.ws_url, guest_token(node.url, name))
            members.append(member)
            assert (await member.request({"type": "join", "room": room}))["type"] == "joined"
        token = guest_token(node.url, "late")
        late = await Client.connect(node.ws_url, token)
        size, joined = await raw_reply(late, {"type": "join", "id": 1, "room": room})
        assert joined["type"] == "joined" and size <= 4096
        assert joined["presence_truncated"] is True and 0 < len(joined["presence"]) < 41
        size, presence = await raw_reply(late, {"type": "presence", "id": 2, "room": room})
        assert size <= 4096 and presence["members_truncated"] is True
        # The whole list stays available through REST.
        full = httpx.get(
            f"{node.url}/rooms/{room}/presence", headers={"Authorization": f"Bearer {token}"}
        )
        assert len(full.json()["members"]) == 41
    finally:
        await asyncio.gather(*(m.close() for m in members))  # before the server goes
        node.stop()


async def test_the_items_snapshot_is_built_once_per_change() -> None:
    """In-process: subscribes (repeat ones, concurrent ones) share one build of the snapshot
    until an item changes."""

    builds = 0

    async def items() -> list[dict[str, int]]:
        nonlocal builds
        builds += 1
        await asyncio.sleep(0.01)  # a database round trip, during which others subscribe
        return [{"id": builds}]

    node = Node(
        node_id="n1",
        broker=MemoryBroker(),
        presence=MemoryPresence(),
        sink=NoSink(),
        history=NoHistory(),
        access=CountingAccess(),
        snapshots={"items": items},
    )
    await node.start()

    async def send(event: dict[str, Any]) -> None:
        return None

    conns = [
        Connection(f"c{i}", UserInfo(str(i), "u"), send, max_queue_bytes=1 << 20, rate=1, burst=1)
        for i in range(3)
    ]
    try:
        for conn in conns:
            node.connect(conn)
        await asyncio.gather(*(node.subscribe(c, p.Subscribe(1, "items", None)) for c in conns))
        reply = await node.subscribe(conns[0], p.Subscribe(2, "items", None))
        assert orjson.loads(reply)["snapshot"] == [{"id": 1}]
        assert builds == 1
        await node.publish_feed("items", {"op": "created", "item": {"id": 2}})
        reply = await node.subscribe(conns[0], p.Subscribe(3, "items", None))
        assert orjson.loads(reply)["snapshot"] == [{"id": 2}] and builds == 2
    finally:
        for conn in conns:
            await node.disconnect(conn)
        await node.close()
