"""uvicorn's HTTP and WebSocket protocols with the opening handshake done once, not three times.

A WebSocket connect under uvicorn's `websockets-sansio` protocol goes through three parsers
and two response builders: httptools parses the upgrade request; uvicorn writes it back out
as bytes; `websockets` parses those bytes again into a `Request` with its `Headers`, checks
them and builds a 101 `Response` (a `Headers` of its own and a formatted date), from which
uvicorn then builds the ASGI scope, and which it edits and serializes on the app's accept.
Profiled during a crowd of connects (docs/BENCHMARKS.md, "The handshake done once") that was
about two fifths of the event loop's time per connect: more than Collab's own token check,
admission and join together, and the reason a node connected at 0.6-0.8 of plain `websockets`'
rate.

These two subclasses keep every maintained parser (httptools for HTTP, `websockets` for
frames, its `ServerProtocol` for every answer other than a 101) and uvicorn's whole
connection life (receive queue, flow control, keepalive, close, shutdown, logging). What
they change is the one common case: a well-formed upgrade (GET, HTTP/1.1, one `Upgrade:
websocket`, a `Connection` naming `upgrade`, one valid `Sec-WebSocket-Key`, version 13) is
checked on the header list httptools already made, the scope is built from it, and the 101
is written from bytes. Anything else (a missing or doubled header, another version, another
method, a non-ASCII target, permessage-deflate switched on) is handed to uvicorn's own
protocol, unchanged, whose `websockets` handshake judges and answers it as before
(`tests/test_websocket_protocol.py` compares the bytes of both for each case).

They rely on uvicorn's internals, as `realtime.transport` does: `protocol_classes()` returns
them only for the uvicorn versions they were checked against, and uvicorn's own names
otherwise; the tests fail when an upgrade of uvicorn adds state these classes do not set.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
from typing import Any, cast
from urllib.parse import unquote

import uvicorn
from uvicorn.config import Config
from uvicorn.logging import TRACE_LOG_LEVEL
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.utils import ClientDisconnected, get_client_addr, get_path_with_query_string
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.protocol import State
from websockets.server import ServerProtocol

__all__ = ["CollabHttpProtocol", "CollabWebSocketProtocol", "protocol_classes"]

# The uvicorn releases whose protocol internals these classes were read against and tested on.
CHECKED_UVICORN = ("0.52.", "0.53.", "0.54.", "0.55.")

_HTTP = "collab.websocket_protocol:CollabHttpProtocol"
_WS = "collab.websocket_protocol:CollabWebSocketProtocol"

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 section 1.3
_SWITCHING = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
_UVICORN_LOG = logging.getLogger("uvicorn.error")


def protocol_classes() -> tuple[str, str]:
    """The `http` and `ws` settings for uvicorn: these classes where checked, else uvicorn's own."""
    if uvicorn.__version__.startswith(CHECKED_UVICORN):
        return _HTTP, _WS
    return "auto", "websockets-sansio"  # pragma: no cover - another uvicorn: its own handshake


def accept_key(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, list[str]] | None:
    """`Sec-WebSocket-Accept` and the offered subprotocols, if this is a plain valid upgrade.

    None for anything `websockets` should judge instead: it knows every way to refuse.
    `headers` are httptools', names lowercased; values never hold CR or LF (one per line).
    """
    key: bytes | None = None
    version: bytes | None = None
    upgrade: bytes | None = None
    connection_upgrade = False
    subprotocols: list[str] = []
    for name, value in headers:
        if name == b"sec-websocket-key":
            if key is not None:
                return None
            key = value
        elif name == b"sec-websocket-version":
            if version is not None:
                return None
            version = value
        elif name == b"upgrade":
            if upgrade is not None:
                return None
            upgrade = value
        elif name == b"connection":
            if not connection_upgrade:
                connection_upgrade = any(
                    token.strip().lower() == b"upgrade" for token in value.split(b",")
                )
        elif name == b"sec-websocket-protocol":
            subprotocols.extend(token.strip() for token in value.decode("latin-1").split(","))
    if (
        key is None
        or version != b"13"
        or upgrade is None
        or upgrade.strip().lower() != b"websocket"
        or not connection_upgrade
    ):
        return None
    try:
        if len(base64.b64decode(key, validate=True)) != 16:
            return None
    except binascii.Error:
        return None
    digest = hashlib.sha1(key + _GUID).digest()  # noqa: S324 - RFC 6455 names SHA-1
    return base64.b64encode(digest), subprotocols


def short_path(http: HttpToolsProtocol) -> tuple[bytes, list[str]] | None:
    """`accept_key` for the upgrade `http` parsed, if this handshake may skip `websockets`'."""
    scope = http.scope
    url: bytes = http.url
    if (
        scope["method"] != "GET"
        or scope["http_version"] != "1.1"
        or http.config.ws_per_message_deflate  # an extension to negotiate: websockets' job
        or not url.startswith(b"/")
        or not url.isascii()
        or b"#" in url
    ):
        return None
    return accept_key(cast(list[tuple[bytes, bytes]], scope["headers"]))


class CollabWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's `websockets-sansio` protocol, started from httptools' parse of the upgrade."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        # uvicorn's own __init__, less its `ServerProtocol`, which `upgrade` builds already
        # open. `tests/test_websocket_protocol.py` checks that this sets every attribute
        # uvicorn's does.
        if not config.loaded:
            config.load()  # pragma: no cover
        self.config = config
        self.app = config.loaded_app
        self.loop = _loop or asyncio.get_event_loop()
        self.logger = _UVICORN_LOG
        self.root_path = config.root_path
        self.asgi_version = config.asgi_version
        self.app_state = app_state
        self.connections = server_state.connections
        self.tasks = server_state.tasks
        self.default_headers = server_state.default_headers
        self.transport = None  # type: ignore[assignment]
        self.server = None
        self.client = None
        self.scheme = None  # type: ignore[assignment]
        self.queue = asyncio.Queue()
        self.handshake_initiated = False
        self.handshake_complete = False
        self.close_sent = False
        self.disconnected = False
        self.close_timer = None
        self.close_timeout = 10.0
        self.initial_response = None
        self.conn = None  # type: ignore[assignment]
        self.read_paused = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.ping_interval = config.ws_ping_interval
        self.ping_timeout = config.ws_ping_timeout
        self.ping_timer = None
        self.pong_timer = None
        self.pending_ping_payload = None
        self.ping_sent_at = 0.0
        self.last_ping_rtt = 0.0
        self.frames = []
        self.curr_msg_data_type = "bytes"
        self._accept: bytes | None = None  # the 101's accept line, on the short path

    def upgrade(self, http: HttpToolsProtocol, key: bytes, subprotocols: list[str]) -> None:
        """Take the connection over from `http`, whose parser stopped at a plain upgrade
        (`short_path`): `key` is its `Sec-WebSocket-Accept`."""
        scope = http.scope
        url: bytes = http.url
        transport = http.transport
        self.connections.add(self)
        self.transport = transport
        self.server = http.server
        self.client = http.client
        self.scheme = "wss" if http.scheme == "https" else "ws"
        if self.logger.level <= TRACE_LOG_LEVEL:
            prefix = "{}:{} - ".format(*self.client) if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sWebSocket connection made", prefix)
        self.conn = ServerProtocol(
            state=State.OPEN,
            max_size=self.config.ws_max_size,
            logger=_UVICORN_LOG,
        )
        self._accept = b"Sec-WebSocket-Accept: " + key + b"\r\n"
        self.handshake_initiated = True
        raw_path, _, query_string = url.decode("ascii").partition("?")
        self.scope = {
            "type": "websocket",
            "asgi": {"version": self.asgi_version, "spec_version": "2.4"},
            "http_version": "1.1",
            "scheme": self.scheme,
            "server": self.server,
            "client": self.client,
            "root_path": self.root_path,
            "path": self.root_path + unquote(raw_path),
            "raw_path": self.root_path.encode("ascii") + raw_path.encode("ascii"),
            "query_string": query_string.encode("ascii"),
            "headers": scope["headers"],
            "subprotocols": subprotocols,
            "state": scope["state"],  # httptools' scope made its copy for this request
            "extensions": {"websocket.http.response": {}},
        }
        self.queue.put_nowait({"type": "websocket.connect"})
        task = self.loop.create_task(self.run_asgi())
        task.add_done_callback(self.on_task_complete)
        self.tasks.add(task)

    def data_received(self, data: bytes) -> None:
        if self._accept is None:  # the 101 is out
            super().data_received(data)
            return
        # Frames before the 101, from a client that did not wait for it (RFC 6455 4.1 says it
        # must): data frames wait for the app, as under uvicorn's protocol; a close or anything
        # unparsable ends the connection with nothing written, since the peer has no WebSocket
        # to read a close frame on (uvicorn's own protocol fails an assertion there).
        self.conn.receive_data(data)
        if self.conn.parser_exc is not None or self.conn.close_rcvd is not None:
            self.conn.data_to_send()  # a close reply the peer could not read
            self.transport.close()
            return
        self.handle_events()

    async def send(self, message: Any) -> None:
        if (
            self._accept is None
            or self.handshake_complete
            or self.initial_response is not None
            or message["type"] != "websocket.accept"
        ):
            await super().send(message)
            return
        # The accept on the short path: uvicorn's, with the 101 written from bytes.
        await self.writable.wait()
        if self.disconnected:
            raise ClientDisconnected()
        if self.logger.isEnabledFor(logging.INFO):
            self.logger.info(
                '%s - "WebSocket %s" [accepted]',
                get_client_addr(self.scope),
                get_path_with_query_string(self.scope),
            )
        out = [_SWITCHING, self._accept]
        for name, value in self.default_headers:
            out += [name, b": ", value, b"\r\n"]
        for name, value in message.get("headers", ()):
            out += [_header_bytes(name).lower(), b": ", _header_bytes(value), b"\r\n"]
        subprotocol = message.get("subprotocol")
        if subprotocol:
            out += [b"Sec-WebSocket-Protocol: ", _header_bytes(subprotocol.encode()), b"\r\n"]
        out.append(b"\r\n")
        if not self.transport.is_closing():
            self.handshake_complete = True
            self._accept = None
            self.transport.write(b"".join(out))
            self.start_keepalive()


def _header_bytes(value: bytes) -> bytes:
    """A header name or value from the app, refused if it could end the header line."""
    if b"\r" in value or b"\n" in value or b"\0" in value:
        raise RuntimeError(f"invalid character in a WebSocket response header: {value!r}")
    return value


class CollabHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, handing an upgrade over without writing it out again."""

    def handle_websocket_upgrade(self) -> None:
        ws_class = self.ws_protocol_class
        if not (isinstance(ws_class, type) and issubclass(ws_class, CollabWebSocketProtocol)):
            super().handle_websocket_upgrade()
            return
        accepted = short_path(self)
        if accepted is None:
            # Anything but a plain upgrade: uvicorn's own protocol, which hands the request to
            # `websockets` to judge and answer. This object is dropped after the upgrade.
            self.ws_protocol_class = WebSocketsSansIOProtocol
            super().handle_websocket_upgrade()
            return
        if self.logger.level <= TRACE_LOG_LEVEL:
            prefix = "{}:{} - ".format(*self.client) if self.client else ""
            self.logger.log(TRACE_LOG_LEVEL, "%sUpgrading to WebSocket", prefix)
        self.connections.discard(self)
        protocol = ws_class(
            config=self.config, server_state=self.server_state, app_state=self.app_state
        )
        protocol.upgrade(self, *accepted)
        self.transport.set_protocol(protocol)
