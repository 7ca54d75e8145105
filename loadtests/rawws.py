"""A minimal asyncio WebSocket client (RFC 6455), cheap per connection and per frame.

The fan-out benchmark holds thousands of subscriber connections in one process and must read
every delivery faster than the server under test can write it, or it would measure itself. A
general client (the `websockets` library) spends tens of microseconds per received frame on
its state machine, futures and queues; this one is an `asyncio.Protocol` that parses frames
straight out of `data_received` and hands each text payload to a plain callback, with no task,
future or queue per frame. It answers pings, honours close frames and masks what it sends;
it does not negotiate extensions (so no per-message deflate) or subprotocols.

`connect(..., stamped=True)` reads the socket with `recvmsg` instead of uvloop's reader, so each
read carries the time the kernel received its data (`SO_TIMESTAMPNS`, Linux): a latency taken
from that is the server's (its writes, the loopback), not the time this process took to get
round to the socket. With thousands of subscribers on one core the generator reads a
message's deliveries one socket after another, about as slowly as a server writes them, so a
latency read at `data_received` measures the generator as much as the server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import urlsplit

__all__ = ["WebSocketClient", "connect", "encode_frame"]

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_MAX_HANDSHAKE = 16 * 1024

TextHandler = Callable[["WebSocketClient", bytes], None]

# Linux's socket option and control message for receive times as a `struct timespec`; the
# values of the common architectures (x86, arm), which Python's socket module does not name.
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
_READ_SIZE = 256 * 1024


def _mask(payload: bytes, key: bytes) -> bytes:
    """XOR with the 4-byte key, as one big-integer operation rather than a loop per byte."""
    n = len(payload)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def encode_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame: masked with a fresh random key, as RFC 6455 requires."""
    n = len(payload)
    first = 0x80 | opcode
    if n < 126:
        header = bytes((first, 0x80 | n))
    elif n < 1 << 16:
        header = bytes((first, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((first, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return header + key + _mask(payload, key)


class WebSocketClient(asyncio.Protocol):
    """One client connection. `on_text(client, payload)` gets every text or binary message."""

    __slots__ = (
        "_buffer",
        "_fragments",
        "_handshake",
        "_host",
        "_key",
        "_resource",
        "_transport",
        "arrived",
        "close_code",
        "closed",
        "extra",
        "on_text",
        "opened",
    )

    def __init__(
        self, host: str, resource: str, on_text: TextHandler, headers: dict[str, str] | None
    ) -> None:
        loop = asyncio.get_running_loop()
        self._host = host
        self._resource = resource
        self._key = base64.b64encode(os.urandom(16)).decode()
        self._handshake: bytearray | None = bytearray()
        self._buffer = b""
        self._fragments: list[bytes] | None = None
        self._transport: asyncio.Transport | None = None
        self.on_text = on_text
        self.opened: asyncio.Future[None] = loop.create_future()
        self.closed: asyncio.Future[int | None] = loop.create_future()
        self.close_code: int | None = None
        # When the kernel received the data being handled (`time.monotonic()`'s clock), on a
        # stamped connection; 0.0 otherwise.
        self.arrived = 0.0
        # Free for the user of the connection: headers to send, then anything it likes.
        self.extra: dict[str, str] = dict(headers or {})

    # -- asyncio.Protocol ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        lines = [
            f"GET {self._resource} HTTP/1.1",
            f"Host: {self._host}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {self._key}",
            "Sec-WebSocket-Version: 13",
            *(f"{name}: {value}" for name, value in self.extra.items()),
        ]
        self._transport.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def data_received(self, data: bytes) -> None:
        if self._handshake is not None:
            self._handshake += data
            end = self._handshake.find(b"\r\n\r\n")
            if end < 0:
                if len(self._handshake) > _MAX_HANDSHAKE:
                    self._fail(ConnectionError("handshake response too long"))
                return
            head, rest = bytes(self._handshake[:end]), bytes(self._handshake[end + 4 :])
            self._handshake = None
            status = head.split(b"\r\n", 1)[0]
            if b" 101 " not in status + b" ":
                self._fail(ConnectionError(f"handshake refused: {status.decode('latin-1')}"))
                return
            if not self.opened.done():
                self.opened.set_result(None)
            if not rest:
                return
            data = rest
        self._frames(self._buffer + data if self._buffer else data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if not self.opened.done():
            self.opened.set_exception(exc or ConnectionError("closed during the handshake"))
            self.opened.exception()  # the opener reads it; no "never retrieved" warning
        if not self.closed.done():
            self.closed.set_result(self.close_code)

    # -- frames ----------------------------------------------------------------------------------

    def _frames(self, buf: bytes) -> None:
        pos, n = 0, len(buf)
        while n - pos >= 2:
            b0, b1 = buf[pos], buf[pos + 1]
            length, header = b1 & 0x7F, 2
            if length == 126:
                if n - pos < 4:
                    break
                length, header = int.from_bytes(buf[pos + 2 : pos + 4], "big"), 4
            elif length == 127:
                if n - pos < 10:
                    break
                length, header = int.from_bytes(buf[pos + 2 : pos + 10], "big"), 10
            key = b""
            if b1 & 0x80:  # servers must not mask, but unmasking costs nothing to support
                if n - pos < header + 4:
                    break
                key = buf[pos + header : pos + header + 4]
                header += 4
            end = pos + header + length
            if end > n:
                break
            payload = buf[pos + header : end]
            if key:
                payload = _mask(payload, key)
            pos = end
            self._frame(b0, payload)
            if self._transport is None:
                return
        self._buffer = buf[pos:] if pos < n else b""

    def _frame(self, b0: int, payload: bytes) -> None:
        opcode, fin = b0 & 0x0F, b0 & 0x80
        if opcode in (OP_TEXT, OP_BINARY):
            if fin:
                self.on_text(self, payload)
            else:
                self._fragments = [payload]
        elif opcode == OP_CONT:
            if self._fragments is None:
                return
            self._fragments.append(payload)
            if fin:
                message, self._fragments = b"".join(self._fragments), None
                self.on_text(self, message)
        elif opcode == OP_PING:
            self._write(encode_frame(OP_PONG, payload))
        elif opcode == OP_CLOSE:
            self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
            self._write(encode_frame(OP_CLOSE, payload[:2]))
            if self._transport is not None:
                self._transport.close()
                self._transport = None
            if not self.closed.done():
                self.closed.set_result(self.close_code)

    # -- sending ---------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self._transport is not None:
            self._transport.write(data)

    def send(self, text: bytes | str) -> None:
        """Send a text message; silently nothing once the connection is gone."""
        if self._transport is not None:
            data = text.encode() if isinstance(text, str) else text
            self._transport.write(encode_frame(OP_TEXT, data))

    @property
    def is_open(self) -> bool:
        return self._transport is not None and self._handshake is None

    def close(self, code: int = 1000) -> None:
        """Send a close frame and drop the connection without waiting for the peer."""
        if self._transport is not None:
            self._transport.write(encode_frame(OP_CLOSE, code.to_bytes(2, "big")))
            self._transport.close()
            self._transport = None
        if not self.closed.done():
            self.closed.set_result(code)

    def abort(self) -> None:
        """Drop the TCP connection at once (no close handshake)."""
        if self._transport is not None:
            self._transport.abort()
            self._transport = None

    def _fail(self, exc: Exception) -> None:
        if not self.opened.done():
            self.opened.set_exception(exc)
        if self._transport is not None:
            self._transport.close()
            self._transport = None


class StampedTransport:
    """The part of an asyncio transport the client uses, over a socket read with `recvmsg`,
    so that each read tells the client when the kernel received it (`WebSocketClient.arrived`).

    Python-level reads cost more than uvloop's, so only the subscribers of a latency
    measurement need it (`connect(..., stamped=True)`).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, client: WebSocketClient
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._client = client
        self._fd = sock.fileno()
        self._unsent = bytearray()
        self._closing = False
        loop.add_reader(self._fd, self._read_ready)

    def _read_ready(self) -> None:
        try:
            data, ancillary, _, _ = self._sock.recvmsg(_READ_SIZE, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        if not data:
            self._lost(None)
            return
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
                seconds, nanoseconds = _TIMESPEC.unpack_from(value)
                # The stamp is wall-clock time; the latencies are on the monotonic clock.
                offset = time.time() - time.monotonic()
                self._client.arrived = seconds + nanoseconds / 1e9 - offset
        self._client.data_received(data)

    def write(self, data: bytes) -> None:
        if self._closing:
            return
        if self._unsent:
            self._unsent += data
            return
        try:
            sent = self._sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            self._lost(exc)
            return
        if sent < len(data):
            self._unsent += data[sent:]
            self._loop.add_writer(self._fd, self._write_ready)

    def _write_ready(self) -> None:
        try:
            sent = self._sock.send(self._unsent)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._lost(exc)
            return
        del self._unsent[:sent]
        if not self._unsent:
            self._loop.remove_writer(self._fd)

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._unsent:  # what is queued (a close frame) goes out first, if it can at once
            with contextlib.suppress(OSError):
                self._sock.send(self._unsent)
        self._lost(None)

    def abort(self) -> None:
        self._lost(None)

    def _lost(self, exc: Exception | None) -> None:
        if self._closing:
            return
        self._closing = True
        self._loop.remove_reader(self._fd)
        self._loop.remove_writer(self._fd)
        self._sock.close()
        self._loop.call_soon(self._client.connection_lost, exc)


_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


async def _stamped_connection(
    host: str, port: int, client: WebSocketClient
) -> tuple[StampedTransport, WebSocketClient]:
    if sys.platform != "linux":
        raise RuntimeError("stamped connections read SO_TIMESTAMPNS, which only Linux has")
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as uvloop's transports
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        await loop.sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    transport = StampedTransport(loop, sock, client)
    client.connection_made(transport)  # type: ignore[arg-type]
    return transport, client


async def connect(
    url: str,
    on_text: TextHandler,
    *,
    headers: dict[str, str] | None = None,
    within: float = 10.0,
    stamped: bool = False,
) -> WebSocketClient:
    """Open `ws://host:port/path?query` and complete the opening handshake; `stamped`:
    through a `StampedTransport`."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None:
        raise ValueError(f"only ws:// URLs are supported here: {url}")
    port = parts.port or 80
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = f"{parts.hostname}:{port}"
    loop = asyncio.get_running_loop()
    opening: Awaitable[tuple[Any, WebSocketClient]]
    if stamped:
        opening = _stamped_connection(
            parts.hostname, port, WebSocketClient(host_header, resource, on_text, headers)
        )
    else:
        opening = loop.create_connection(
            lambda: WebSocketClient(host_header, resource, on_text, headers),
            parts.hostname,
            port,
        )
    _, client = await asyncio.wait_for(opening, within)
    try:
        await asyncio.wait_for(asyncio.shield(client.opened), within)
    except BaseException:
        client.abort()
        with contextlib.suppress(BaseException):
            client.opened.exception()
        raise
    return client
