"""Frames written straight to uvicorn's transport (`realtime.transport`), and the fallback.

`collab serve` writes each message's prebuilt frame to every member's transport, bypassing
ASGI `send`. That leans on uvicorn's internals, so these tests pin both halves: under
`collab serve` the direct path must engage (if a uvicorn upgrade changes what it relies on,
the first test here fails instead of the server silently getting slower), and under any other
server the same app must work through plain ASGI `send`.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from realtime.broker import Publication
from realtime.connection import Connection
from realtime.hub import Channel, Hub, Member
from realtime.transport import Outbox, text_frame
from realtime.types import UserInfo
from tests.processes import UVICORN_WSPROTO, ServerProcess, server_env
from tests.test_hub_order import QuietBroker
from tests.wsclient import Client, guest_token


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_prebuilt_frame_is_the_frame_websockets_would_send(size: int) -> None:
    payload = ("é" * size).encode()[:size]  # multi-byte UTF-8, cut anywhere: bytes are bytes
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def direct_connections(server: ServerProcess) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    found = re.search(r"^collab_direct_write_connections (\S+)$", metrics, re.M)
    assert found, "collab_direct_write_connections missing from /metrics"
    return float(found.group(1))


@pytest.fixture(params=["collab serve", "uvicorn --ws wsproto"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    command = None if request.param == "collab serve" else UVICORN_WSPROTO
    env = server_env(tmp_path, {"COLLAB_RATE_LIMIT": "1000", "COLLAB_RATE_BURST": "1000"})
    node = ServerProcess(env, tmp_path / "server.log", command=command).start()
    try:
        yield node
    finally:
        node.stop()


async def test_a_burst_reaches_every_member_whole_and_in_order(server: ServerProcess) -> None:
    """Many messages in one loop turn: coalesced per member, still one frame per message."""
    room = f"r-{uuid.uuid4().hex[:8]}"
    members = [
        await Client.connect(server.ws_url, guest_token(server.url, f"m{i}")) for i in range(3)
    ]
    for member in members:
        await member.request({"type": "join", "room": room})
    direct = direct_connections(server)
    assert direct == (3 if server.command is None else 0), server.log()

    bodies = [{"n": n, "text": "ü" * (n * 40)} for n in range(200)]  # 0 B to 16 KB frames
    for body in bodies:
        await members[0].send({"type": "publish", "room": room, "body": body})
    for member in members:
        got = await member.messages(room, len(bodies), timeout=20)
        assert [m["body"] for m in got] == bodies
        assert [m["offset"] for m in got] == list(range(1, len(bodies) + 1))
    # Replies to one connection alone (acks, errors) take the same path.
    error = await members[1].request({"type": "publish", "room": "not-joined", "body": {"n": -1}})
    assert error["type"] == "error" and error["code"] == "not_joined"


# -- When frames are written: at once for a lone message, once per loop turn in a burst ----------


class RecordingTransport:
    """What the kernel would be handed: one entry per `write` (one system call each)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        raise AssertionError("nothing here should abort")


def open_socket() -> tuple[Any, RecordingTransport]:
    """uvicorn's own websockets-sansio protocol, past its handshake, on a recording transport."""

    async def app(scope: Any, receive: Any, send: Any) -> None:  # never called
        raise AssertionError

    proto = WebSocketsSansIOProtocol(Config(app=app, ws="websockets-sansio"), ServerState(), {})
    transport = RecordingTransport()
    proto.transport = cast(asyncio.Transport, transport)  # a stand-in, duck-typed
    proto.conn.state = State.OPEN
    proto.handshake_complete = True
    return proto, transport


def member(
    hub: Hub, outbox: Outbox, room: str, name: str
) -> tuple[Connection, Any, RecordingTransport]:
    proto, transport = open_socket()
    conn = Connection(
        name,
        UserInfo(id=name, name=name),
        proto.send,
        max_queue_bytes=1 << 20,
        rate=1e6,
        burst=1_000_000,
        outbox=outbox,
    )
    assert conn.writes_directly
    hub.add_connection(conn)
    hub.channels.setdefault(room, Channel(room)).members[name] = Member(conn, pending=None)
    return conn, proto, transport


def published(room: str, offset: int) -> Publication:
    return Publication(room, "e1", offset, b'{"type":"message","offset":%d}' % offset)


def wire(*offsets: int) -> bytes:
    return b"".join(text_frame(b'{"type":"message","offset":%d}' % n) for n in offsets)


async def next_turn() -> None:
    """Let the loop finish this turn (the outbox flushes on the next)."""
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def test_a_lone_message_is_written_as_the_fan_out_goes() -> None:
    """Each member's frame is handed to its socket during the fan-out, not after the turn."""
    outbox = Outbox()
    hub = Hub(QuietBroker(), outbox=outbox)  # type: ignore[arg-type]
    members = [member(hub, outbox, "room:a", f"m{i}") for i in range(3)]
    hub.on_publication(published("room:a", 1))
    for _, _, transport in members:
        assert transport.writes == [wire(1)]  # before the loop turn ends
    await next_turn()
    hub.on_publication(published("room:a", 2))  # alone in its turn again: at once again
    for _, _, transport in members:
        assert transport.writes == [wire(1), wire(2)]


async def test_a_burst_costs_each_member_one_write_per_loop_turn() -> None:
    outbox = Outbox()
    hub = Hub(QuietBroker(), outbox=outbox)  # type: ignore[arg-type]
    members = [member(hub, outbox, "room:a", f"m{i}") for i in range(2)]
    for offset in (1, 2, 3):  # one turn: the first goes at once, the rest wait for its end
        hub.on_publication(published("room:a", offset))
    for _, _, transport in members:
        assert transport.writes == [wire(1)]
    await next_turn()
    for _, _, transport in members:
        assert transport.writes == [wire(1), wire(2, 3)]
    for offset in (4, 5):  # the burst goes on: the whole turn in one write
        hub.on_publication(published("room:a", offset))
    await next_turn()
    hub.on_publication(published("room:a", 6))  # the turn after a burst still coalesces
    await next_turn()
    hub.on_publication(published("room:a", 7))  # quiet again: at once
    for _, _, transport in members:
        assert transport.writes == [wire(1), wire(2, 3), wire(4, 5), wire(6), wire(7)]


async def test_a_message_written_through_stays_behind_what_the_turn_gave_first() -> None:
    outbox = Outbox()
    hub = Hub(QuietBroker(), outbox=outbox)  # type: ignore[arg-type]
    (conn, _, transport), (_, _, other) = (member(hub, outbox, "room:a", n) for n in "ab")
    conn.reply(b'{"type":"ack"}')  # waits for the turn's end
    hub.on_publication(published("room:a", 1))
    assert other.writes == [wire(1)]
    assert transport.writes == []  # not ahead of the reply
    await next_turn()
    assert transport.writes == [text_frame(b'{"type":"ack"}') + wire(1)]


async def test_a_socket_above_its_high_water_gets_nothing_written_through() -> None:
    outbox = Outbox()
    hub = Hub(QuietBroker(), outbox=outbox)  # type: ignore[arg-type]
    (slow, proto, transport), (_, _, other) = (member(hub, outbox, "room:a", n) for n in "ab")
    proto.writable.clear()  # what uvicorn does when the transport pauses writing
    hub.on_publication(published("room:a", 1))
    await next_turn()
    assert other.writes == [wire(1)]
    assert transport.writes == [] and slow.backed_up  # queued for its writer, in the bound
    proto.writable.set()
    await next_turn()
    assert transport.writes == [wire(1)]


async def test_nothing_is_written_through_to_a_closing_socket() -> None:
    outbox = Outbox()
    hub = Hub(QuietBroker(), outbox=outbox)  # type: ignore[arg-type]
    (_, proto, transport), (_, _, other) = (member(hub, outbox, "room:a", n) for n in "ab")
    proto.close_sent = True  # the server's close frame is out: no data frame may follow it
    hub.on_publication(published("room:a", 1))
    await next_turn()
    assert other.writes == [wire(1)] and transport.writes == []


async def test_a_socket_that_fails_a_write_costs_the_others_nothing() -> None:
    outbox = Outbox()
    hub = Hub(QuietBroker(), outbox=outbox)  # type: ignore[arg-type]
    first, (_, _, broken), last = (member(hub, outbox, "room:a", n) for n in "abc")

    def closed(data: bytes) -> None:  # uvloop's answer once the handle is closed under us
        raise RuntimeError("unable to perform operation: the handler is closed")

    broken.write = closed  # type: ignore[method-assign]
    hub.on_publication(published("room:a", 1))
    assert first[2].writes == [wire(1)] and last[2].writes == [wire(1)]
