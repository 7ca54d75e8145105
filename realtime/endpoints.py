"""`/ws/chat` and `/ws/live` as plain ASGI apps: they move frames between a socket and the node.

Plain ASGI rather than Starlette's `WebSocket` wrapper: delivery writes into the server's
`send` or its transport directly (see `connection.py` and `transport.py`), and the reader
needs nothing the wrapper adds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import parse_qs

from realtime import protocol as p
from realtime.broker import BrokerUnavailable
from realtime.connection import Connection
from realtime.node import Node, new_conn_id
from realtime.presence import PresenceUnavailable
from realtime.storage import SinkUnavailable
from realtime.types import UserInfo

log = logging.getLogger("collab.realtime")


@dataclass(frozen=True, slots=True)
class Credential:
    """What a client showed to connect: a one-use `ticket` (`?ticket=`), or a bearer `token`
    (`Authorization: Bearer`, or `?token=`, the weaker option: a URL ends up in logs)."""

    kind: Literal["ticket", "token"]
    value: str


# Who the credential belongs to, or None to refuse it; implemented outside this package.
Authenticator = Callable[[Credential], Awaitable[UserInfo | None]]
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_UNAVAILABLE = (BrokerUnavailable, PresenceUnavailable, SinkUnavailable)


class CredentialStoreBusy(Exception):
    """Raised by an authenticator whose store (the database) is overloaded, not broken:
    the socket is closed with 1013 ("try again later"), as a busy REST request gets 503."""


def _header(scope: Scope, name: bytes) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key == name:
            return value.decode("latin-1")
    return None


def connection_credential(scope: Scope) -> Credential | None:
    """`?ticket=`, else `?token=`, else `Authorization: Bearer`."""
    raw: bytes = scope.get("query_string", b"")
    try:
        query = parse_qs(raw.decode("latin-1"), max_num_fields=20)
    except ValueError:  # more fields than any client of ours sends
        query = {}
    for kind in ("ticket", "token"):
        values = query.get(kind)
        if values and values[0]:
            return Credential("ticket" if kind == "ticket" else "token", values[0])
    header = _header(scope, b"authorization")
    if header and header[:7].lower() == "bearer ":
        token = header[7:].strip()
        return Credential("token", token) if token else None
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
        if (await receive())["type"] != "websocket.connect":
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
            close_timeout=limits.close_timeout,
        )
        serving = asyncio.current_task()
        stuck = False

        def stop_serving() -> None:
            # A close frame stuck behind a peer that reads nothing (ASGI `send` only; direct
            # writes abort the transport instead): stop waiting for its commands.
            nonlocal stuck
            stuck = True
            if serving is not None:
                serving.cancel()

        conn.on_stuck = stop_serving
        conn.reply(node.connect(conn))
        try:
            await self._serve(node, conn, receive)
            await conn.wait_closed()
        except asyncio.CancelledError:
            if not stuck or serving is None:
                raise
            serving.uncancel()  # ours, not the server's: return, and the server drops it
        finally:
            conn.on_stuck = None
            await node.disconnect(conn)

    async def _refusal(self, scope: Scope, node: Node) -> UserInfo | int:
        if not origin_allowed(scope, self.allowed_origins):
            return int(p.CloseCode.FORBIDDEN_ORIGIN)
        credential = connection_credential(scope)
        user = None
        if credential is not None and len(credential.value) <= 4096:
            try:
                user = await self.authenticate(credential)
            except CredentialStoreBusy:
                log.warning("a connection's credential could not be checked: store busy")
                return int(p.CloseCode.TRY_AGAIN_LATER)
            except Exception:
                # A store behind the check (database, Redis) failed: not the client's fault,
                # so not 4401 ("get a new token") but 1011 ("reconnect").
                log.exception("could not check a connection's credential")
                return int(p.CloseCode.INTERNAL_ERROR)
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
                # Sent off only past the channel cap too: a client that rejoins every room it
                # may hold in one go, without pacing, gets `rate_limited` for the rooms past
                # the burst (and may ask again), not a 1008 that its reconnect would repeat.
                if conn.flood_strikes > max(limits.burst, limits.max_channels_per_connection):
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
        command: p.Command | None = None
        reply: bytes | None
        try:
            command = p.parse_command(data, self.kind, max_body_bytes=node.limits.max_body_bytes)
            command_id = command.id
            if isinstance(command, p.Refresh):
                credential = Credential("token", command.token)
                reply = node.refresh(conn, command, await self.authenticate(credential))
            else:
                reply = await node.handle(conn, command)
        except p.ProtocolError as exc:
            reply = exc.frame()
        except BrokerUnavailable as exc:
            if exc.maybe_sent and isinstance(command, p.Publish):
                reply = p.delivery_unknown(command_id, command.room, str(exc))
            else:
                reply = p.error(
                    command_id, p.ErrorCode.UNAVAILABLE, f"backend unavailable, not done: {exc}"
                )
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
