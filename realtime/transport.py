"""Frames built once per message, and written straight to uvicorn's transport when possible.

A message to a room of 2,000 members is the same 2,000 times: server frames are not masked,
so its WebSocket frame is the same bytes for every member. Going through ASGI's
`send({"type": "websocket.send", "text": ...})` would encode the text, frame it and join the
output again for each member, and await an event on the way; that was about a quarter of the
server's time in a fan-out. So a frame is built once (`Outgoing`) and, when the server is
uvicorn's `websockets-sansio` protocol (what `collab serve` and the Gunicorn worker run), written
to the member's transport directly (`DirectWriter`).

That relies on uvicorn's internals: `direct_writer` checks every attribute it uses and returns
None when anything differs (another server, another uvicorn protocol, a future uvicorn, an
extension such as permessage-deflate negotiated), and the connection then uses ASGI `send` as
any ASGI server expects. `tests/test_direct_writes.py` fails when the direct path stops
engaging under `collab serve`, so an upgrade cannot silently make it slower.

A message that comes alone is written through: each member's frame goes to its transport in
the fan-out loop itself, so the first member has it at once rather than after the loop has
visited every member and the loop turn has ended (at 2,000 members that wait was 2.7 ms before
the first write of every message, measured in docs/BENCHMARKS.md, and every member's latency
paid it). Once the node is in a burst (a loop turn that fanned out more than one message),
writes of one loop turn are coalesced per connection (`Outbox`): each member gets one `write`
system call per turn instead of one per message.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from typing import Any, Protocol

from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import Protocol as WebSocketsProtocol
from websockets.protocol import State

try:
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
except ImportError:  # pragma: no cover - a uvicorn without it: ASGI send for everyone
    WebSocketsSansIOProtocol = None  # type: ignore[assignment,misc]

log = logging.getLogger("collab.realtime")

_OPEN = State.OPEN
_TEXT_FIN = 0x81  # FIN, opcode 1 (text); RSV bits clear: no extension applies


def text_frame(payload: bytes) -> bytes:
    """An unmasked, unfragmented text frame (RFC 6455 §5.2) carrying `payload` (UTF-8)."""
    size = len(payload)
    if size < 126:
        return bytes((_TEXT_FIN, size)) + payload
    if size < 1 << 16:
        return struct.pack("!BBH", _TEXT_FIN, 126, size) + payload
    return struct.pack("!BBQ", _TEXT_FIN, 127, size) + payload


class Outgoing:
    """One server frame for any number of members: the wire bytes, and the text if needed.

    `now`: write it to a member with nothing else waiting this loop turn at once, rather than
    with the turn's other frames when the turn ends (`Outbox.fanout` decides, per message).
    """

    __slots__ = ("_text", "now", "payload", "wire")

    def __init__(self, payload: bytes, now: bool = False) -> None:
        self.payload = payload
        self.wire = text_frame(payload)
        self.now = now
        self._text: str | None = None

    @property
    def text(self) -> str:
        """For connections on ASGI `send`; decoded at most once, however many need it."""
        if self._text is None:
            self._text = self.payload.decode()
        return self._text


class _Transport(Protocol):
    def write(self, data: bytes) -> None: ...

    def get_write_buffer_size(self) -> int: ...

    def abort(self) -> None: ...


class DirectWriter:
    """Writes whole frames to one uvicorn connection's transport, as its `send` would."""

    __slots__ = ("_conn", "_proto", "transport", "writable")

    def __init__(self, proto: Any, transport: _Transport, writable: asyncio.Event) -> None:
        self._proto = proto
        self._conn = proto.conn
        self.transport = transport
        self.writable = writable

    def alive(self) -> bool:
        """Open both ways: no close sent or received, the peer still connected."""
        proto = self._proto
        return not (proto.close_sent or proto.disconnected) and self._conn.state is _OPEN

    # `writable` is set while the transport is below its high-water mark: what uvicorn's own
    # `send` waits for before it writes.


def direct_writer(send: Any) -> DirectWriter | None:
    """A DirectWriter for this ASGI `send` if it is uvicorn's websockets-sansio, else None.

    Call it after the `websocket.accept`: frames may be written directly only once the
    handshake is complete, and only when no extension (permessage-deflate) was negotiated,
    because the prebuilt frames are not compressed.
    """
    proto = getattr(send, "__self__", None)
    if proto is None or WebSocketsSansIOProtocol is None:
        return None
    if not isinstance(proto, WebSocketsSansIOProtocol) or send != proto.send:
        return None
    transport = getattr(proto, "transport", None)
    writable = getattr(proto, "writable", None)
    conn = getattr(proto, "conn", None)
    if (
        transport is None
        or not callable(getattr(transport, "write", None))
        or not callable(getattr(transport, "get_write_buffer_size", None))
        or not isinstance(writable, asyncio.Event)
        or not isinstance(conn, WebSocketsProtocol)
        or getattr(proto, "handshake_complete", None) is not True
        or not isinstance(getattr(proto, "close_sent", None), bool)
        or not isinstance(getattr(proto, "disconnected", None), bool)
        or conn.extensions
        or conn.state is not State.OPEN
    ):
        return None
    _release_handshake(proto)
    return DirectWriter(proto, transport, writable)


def _release_handshake(proto: Any) -> None:
    """Drop what uvicorn keeps of a completed handshake and never reads again.

    The protocol keeps the upgrade request and the 101 response (each with its `Headers`),
    and the ASGI scope keeps the request's headers once more as bytes: about 5 KB of every
    idle connection (measured at 2,000 connections; see docs/BENCHMARKS.md), for hours.
    uvicorn reads `request` and `response` only before the handshake completes, and the
    endpoint has read the headers (origin, credential) before its accept; the scope's other
    entries (path, query string, client) stay for uvicorn's log lines. The request's headers
    are emptied rather than only unreferenced: `websockets`' parser keeps the request in
    a local variable for the connection's life. Only what is there with exactly the expected
    types is touched.
    """
    request = getattr(proto, "request", None)
    if isinstance(request, Request):
        request.headers = Headers()
        proto.request = None
    if isinstance(getattr(proto, "response", None), Response):
        proto.response = None
    scope = getattr(proto, "scope", None)
    if isinstance(scope, dict) and isinstance(scope.get("headers"), list):
        scope["headers"] = []


class Flushable(Protocol):
    """What the outbox needs of a connection: imports go from connection to transport only."""

    conn_id: str

    def flush(self) -> None:
        """Write what this loop turn gave the connection, in one go."""


class Outbox:
    """The connections with frames written during this loop turn; flushed once, after it.

    One per node (one event loop). Each flush gives every such connection one `write` of what
    it got during the turn, in order.

    It also tells a fan-out whether to write through (`fanout`): the first message of a turn
    does, unless the turn before fanned out more than one. A lone message thus reaches every
    member as the fan-out loop goes, while a burst, whose turns carry many messages, costs
    each member one write per turn. A burst pays at most one write more per member, on the
    turn it starts in.
    """

    __slots__ = ("_bursting", "_dirty", "_fanouts", "_scheduled")

    def __init__(self) -> None:
        self._dirty: list[Flushable] = []
        self._scheduled = False
        self._fanouts = 0  # messages fanned out in this loop turn
        self._bursting = False  # the last turn that fanned out did so more than once

    def fanout(self) -> bool:
        """Count one message about to go to many members; True: write it through."""
        self._fanouts += 1
        if not self._scheduled:
            self._schedule()
        return self._fanouts == 1 and not self._bursting

    def add(self, conn: Flushable) -> None:
        self._dirty.append(conn)
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        if self._fanouts:
            self._bursting = self._fanouts > 1
            self._fanouts = 0
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            try:
                conn.flush()
            except Exception:  # one broken connection must not cost the others their frames
                log.exception("writing to connection %s failed", conn.conn_id)
