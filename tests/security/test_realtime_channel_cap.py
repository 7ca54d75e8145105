"""A cap on rooms and feeds per connection (issue 15, Medium: one socket joined 150 rooms).

`COLLAB_MAX_CHANNELS_PER_CONNECTION` (default 128) rooms and feeds per WebSocket; past it a
join or subscribe gets `too_many_channels` and changes nothing. A repeat join of a room
already joined is answered from the node's own state (`already_joined: true`): no broker,
presence or database call, which the in-process test counts.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from realtime import protocol as p
from realtime.broker_memory import MemoryBroker
from realtime.connection import Connection
from realtime.node import Node, NodeLimits
from realtime.presence_memory import MemoryPresence
from realtime.storage import HistoryReader, MessageSink, RoomAccess, StoredMessage
from realtime.types import Position, UserInfo
from tests.processes import ServerProcess, server_env
from tests.wsclient import Client, guest_token

CAP = 4


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("cap")
    env = server_env(
        folder,
        {"COLLAB_MAX_CHANNELS_PER_CONNECTION": str(CAP), "COLLAB_PUBLIC_FEEDS": "public.*"},
    )
    node = ServerProcess(env, folder / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


@pytest.mark.slow
async def test_rooms_per_connection_are_capped(server: ServerProcess) -> None:
    client = await Client.connect(server.ws_url, guest_token(server.url, "greedy"))
    rooms = [f"cap-{uuid.uuid4().hex[:8]}" for _ in range(CAP + 1)]
    for room in rooms[:CAP]:
        assert (await client.request({"type": "join", "room": room}))["type"] == "joined"
    refused = await client.request({"type": "join", "room": rooms[CAP]})
    assert refused["type"] == "error" and refused["code"] == "too_many_channels", refused
    # Not joined: publishing there is refused; presence there is empty.
    not_in = await client.request({"type": "publish", "room": rooms[CAP], "body": {}})
    assert not_in["code"] == "not_joined"
    # A repeat join at the cap is no new channel: answered, cheaply.
    again = await client.request({"type": "join", "room": rooms[0]})
    assert again["type"] == "joined" and again["already_joined"] is True
    # Leaving one makes room for another.
    await client.request({"type": "leave", "room": rooms[0]})
    assert (await client.request({"type": "join", "room": rooms[CAP]}))["type"] == "joined"


@pytest.mark.slow
async def test_feeds_per_connection_are_capped(server: ServerProcess) -> None:
    client = await Client.connect(server.ws_url, guest_token(server.url, "dash"), "/ws/live")
    for i in range(CAP):
        reply = await client.request({"type": "subscribe", "feed": f"public.f{i}"})
        assert reply["type"] == "subscribed"
    refused = await client.request({"type": "subscribe", "feed": "public.more"})
    assert refused["type"] == "error" and refused["code"] == "too_many_channels"
    again = await client.request({"type": "subscribe", "feed": "public.f0"})
    assert again["type"] == "subscribed"


# -- in-process: a repeat join asks no backend ----------------------------------------------


class CountingBroker(MemoryBroker):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def position(self, channel: str) -> Position:
        self.calls += 1
        return await super().position(channel)

    async def subscribe(self, channel: str) -> None:
        self.calls += 1
        await super().subscribe(channel)


class CountingPresence(MemoryPresence):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    async def add(self, room: str, conn_id: str, user: UserInfo, node_id: str) -> bool:
        self.calls += 1
        return await super().add(room, conn_id, user, node_id)

    async def members(self, room: str) -> list[Any]:
        self.calls += 1
        return await super().members(room)


class CountingAccess(RoomAccess):
    def __init__(self) -> None:
        self.calls = 0

    async def can_access(self, room: str, user: UserInfo) -> bool:
        self.calls += 1
        return True


class NoHistory(HistoryReader):
    async def page(
        self,
        room: str,
        epoch: str | None,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> tuple[list[StoredMessage], bool]:
        return [], False

    async def last_position(self, room: str) -> tuple[str, int] | None:
        return None


class NoSink(MessageSink):
    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def store(self, message: StoredMessage) -> None: ...


async def test_a_repeat_join_asks_no_backend(tmp_path: Path) -> None:
    broker, presence, access = CountingBroker(), CountingPresence(), CountingAccess()
    node = Node(
        node_id="n1",
        broker=broker,
        presence=presence,
        sink=NoSink(),
        history=NoHistory(),
        access=access,
        limits=NodeLimits(max_channels_per_connection=2),
    )
    await node.start()
    sent: list[dict[str, Any]] = []

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "websocket.send":
            sent.append(orjson.loads(event["text"]))

    conn = Connection("c1", UserInfo("1", "ann"), send, max_queue_bytes=1 << 20, rate=1, burst=1)
    node.connect(conn)
    try:
        await node.handle(conn, p.Join(1, "r", None, True))
        before = (broker.calls, presence.calls, access.calls)
        reply = await node.handle(conn, p.Join(2, "r", None, True))
        assert reply is not None and orjson.loads(reply)["already_joined"] is True
        assert (broker.calls, presence.calls, access.calls) == before
        await node.handle(conn, p.Join(3, "s", None, True))
        with pytest.raises(p.ProtocolError) as refused:
            await node.handle(conn, p.Join(4, "t", None, True))
        assert refused.value.code == p.ErrorCode.TOO_MANY_CHANNELS
        assert conn.joined == {"room:r", "room:s"}
    finally:
        await node.disconnect(conn)
        await node.close()
