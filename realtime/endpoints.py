"""`/ws/chat` and `/ws/live` as plain ASGI apps: they move frames between a socket and the node.

Plain ASGI rather than Starlette's `WebSocket` wrapper: delivery writes into the server's
`send` or its transport directly (see `connection.py` and `transport.py`), and the reader
needs nothing the wrapper adds.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs

from realtime import protocol as p
from realtime.broker import BrokerUnavailable
from realtime.connection import Connection
from realtime.node import Node, new_conn_id
from realtime.presence import PresenceUnavailable
from realtime.storage import SinkUnavailable
from realtime.types import UserInfo

log = logging.getLogger("collab.realtime")

Authenticator = Callable[[str], Awaitable[UserInfo | None]]
"""A token to the user it names (with the token's role and expiry), or None when invalid."""
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_UNAVAILABLE = (BrokerUnavailable, PresenceUnavailable, SinkUnavailable)


def _header(scope: Scope, name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def bearer_token(scope: Scope) -> str | None:
    """The token from `?token=` (what a browser can send) or `Authorization: Bearer`."""
    raw: bytes = scope.get("query_string", b"")
    try:
        query = parse_qs(raw.decode("latin-1"), max_num_fields=20)
    except ValueError:  # more fields than any client of ours sends
        query = {}
    tokens = query.get("token")
    if tokens and tokens[0]:
        return tokens[0]
    header = _header(scope, b"authorization")
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return None


def origin_allowed(scope: Scope, allowed: list[str]) -> bool:
    """No Origin (a non-browser client) is allowed; a browser's must be on the list."""
    origin = _header(scope, b"origin")
    if origin is None or "*" in allowed:
        return True
    return origin.rstrip("/") in {a.rstrip("/") for a in allowed}


class WebSocketEndpoint:
    """One endpoint (`chat` or `live`) of one node."""

    def __init__(
        self,
        kind: p.Endpoint,
        node_getter: Callable[[], Node],
        authenticate: Authenticator,
        allowed_origins: list[str],
    ) -> None:
        self.kind = kind
        self.node_getter = node_getter
        self.authenticate = authenticate
        self.allowed_origins = allowed_origins

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        node = self.node_getter()
        refusal = await self._refusal(scope, node)
        if isinstance(refusal, int):
            # Accept, then close: a browser can read a close code, not an HTTP status.
            await send({"type": "websocket.accept"})
            reason = p.CLOSE_REASONS.get(p.CloseCode(refusal), "") if refusal in _CODES else ""
            await send({"type": "websocket.close", "code": refusal, "reason": reason})
            return
        user = refusal
        conn_id = new_conn_id(node.node_id)
        cluster_refusal = await node.claim(user, conn_id)
        try:
            await send({"type": "websocket.accept"})
        except BaseException:
            if cluster_refusal is None:
                await node.release(user, conn_id)
            raise
        if cluster_refusal is not None:
            reason = p.CLOSE_REASONS[cluster_refusal]
            await send({"type": "websocket.close", "code": int(cluster_refusal), "reason": reason})
            return
        limits = node.limits
        conn = Connection(
            conn_id,
            user,
            send,
            max_queue_bytes=limits.outgoing_queue_bytes,
            rate=limits.rate,
            burst=limits.burst,
            outbox=node.outbox,
        )
        conn.reply(node.connect(conn))
        try:
            await self._serve(node, conn, receive)
            await conn.wait_closed()
        finally:
            await node.disconnect(conn)

    async def _refusal(self, scope: Scope, node: Node) -> UserInfo | int:
        if not origin_allowed(scope, self.allowed_origins):
            return int(p.CloseCode.FORBIDDEN_ORIGIN)
        token = bearer_token(scope)
        user = await self.authenticate(token) if token and len(token) <= 4096 else None
        if user is None:
            return int(p.CloseCode.UNAUTHORIZED)
        refusal = node.admit(user)
        return int(refusal) if refusal is not None else user

    async def _serve(self, node: Node, conn: Connection, receive: Receive) -> None:
        limits = node.limits
        while not conn.closing:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            data: str | bytes | None = message.get("text")
            if data is None:
                data = message.get("bytes") or b""
            if len(data) > limits.max_frame_bytes:
                await conn.close(p.CloseCode.MESSAGE_TOO_BIG)
                return
            if not conn.bucket.take():
                conn.flood_strikes += 1
                if conn.flood_strikes > limits.burst:
                    await conn.close(p.CloseCode.POLICY_VIOLATION)
                    return
                command_id = _peek_id(data)
                conn.reply(
                    p.error(
                        command_id,
                        p.ErrorCode.RATE_LIMITED,
                        f"over {limits.rate:g} commands/s (burst {limits.burst}); slow down",
                    )
                )
                continue
            conn.flood_strikes = 0
            await self._command(node, conn, data)

    async def _command(self, node: Node, conn: Connection, data: str | bytes) -> None:
        command_id: p.CommandId = None
        reply: bytes | None
        try:
            command = p.parse_command(data, self.kind, max_body_bytes=node.limits.max_body_bytes)
            command_id = command.id
            if isinstance(command, p.Refresh):
                reply = node.refresh(conn, command, await self.authenticate(command.token))
            else:
                reply = await node.handle(conn, command)
        except p.ProtocolError as exc:
            reply = exc.frame()
        except _UNAVAILABLE as exc:
            reply = p.error(
                command_id, p.ErrorCode.UNAVAILABLE, f"backend unavailable, not done: {exc}"
            )
        except Exception:
            log.exception("command failed on connection %s", conn.conn_id)
            reply = p.error(command_id, p.ErrorCode.INTERNAL, "internal error, not done")
        if reply:
            conn.reply(reply)


_CODES = {int(code) for code in p.CloseCode}


def _peek_id(data: str | bytes) -> p.CommandId:
    """The command's id for a rate-limit error, without carrying the command out."""
    try:
        return p.parse_command(data, "chat", max_body_bytes=1 << 30).id
    except p.ProtocolError as exc:
        return exc.id
