"""The node: every command of docs/PROTOCOL.md carried out over the hub and the backends.

`Node` is the centre of the realtime core. It starts with whatever backends it is given
(memory ones for one process, Redis ones for many) and the storage interfaces that
`persistence` implements. The endpoints only move frames between sockets and `Node.handle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, assert_never

import orjson

from realtime import protocol as p
from realtime.broker import Broker, BrokerUnavailable, PublishResult
from realtime.connection import Connection
from realtime.hub import Hub, in_slices
from realtime.presence import Member, Presence, PresenceUnavailable
from realtime.reconciler import Reconciler
from realtime.stats import Stat, gauge
from realtime.stats_feed import StatsPublisher
from realtime.storage import (
    HistoryReader,
    MessageRefused,
    MessageSink,
    RoomAccess,
    SinkUnavailable,
    StoredMessage,
)
from realtime.transport import Outbox
from realtime.types import Position, UserInfo, new_msg_id
from realtime.user_connections import UserConnections, UserConnectionsUnavailable

log = logging.getLogger("collab.realtime")

ROOM = "room:"
FEED = "feed:"
# Every node subscribes to this channel at start: node-wide orders (close a user's sockets)
# reach the whole cluster through the broker. No client can name it (rooms and feeds are
# prefixed), so no client can join or publish to it.
CONTROL = "control:nodes"
# Roles that may subscribe to any feed; everyone else gets only the public ones.
FEED_ROLES = frozenset({"service", "admin"})
# A cached snapshot is used while its feed's position is unchanged (every item change moves
# it, on every node), and never longer than this: a change whose announcement failed
# (broker down) shows up at the latest this much later.
SNAPSHOT_MAX_AGE = 5.0
# How many stored messages a reconnecting client may be handed in `missed`; past this it
# reloads history instead (a client that was away that long wants a page, not a flood).
MAX_RECOVERY = 1000
# Presence joins and leaves are gathered this long and announced in one event per room.
PRESENCE_COALESCE = 0.1

SnapshotProvider = Callable[[], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class NodeLimits:
    max_body_bytes: int = 16 * 1024
    max_frame_bytes: int = 64 * 1024
    rate: float = 20.0
    burst: int = 50
    max_connections_per_user: int = 20
    max_connections: int = 10_000
    outgoing_queue_bytes: int = 1024 * 1024
    heartbeat: float = 25.0
    presence_timeout: float = 30.0
    # How long a close (4408, 4401, ...) may wait behind frames the peer has not read before
    # the socket is dropped without it.
    close_timeout: float = 30.0
    # The most one reply (a history page, a join's `missed`, a snapshot) may hold: a reply is
    # written while the socket is writable, so without a bound one command could make the
    # node buffer far more than the outgoing queue allows.
    max_reply_bytes: int = 512 * 1024
    max_channels_per_connection: int = 128
    # Feeds any authenticated user may subscribe to: exact names, or prefixes ending in `*`.
    public_feeds: tuple[str, ...] = ("items", "stats")
    # Further feeds for some: (feed rule, {"user:<id>", "role:<role>", ...}).
    feed_grants: tuple[tuple[str, frozenset[str]], ...] = ()
    # Frames a channel holds while it recovers a gap (see `Hub`), across its members.
    max_backlog_bytes: int = 8 * 1024 * 1024

    @property
    def reply_budget(self) -> int:
        """Bytes of a reply's payload (messages, snapshot, presence), leaving an eighth of the
        bound for the rest of it."""
        return max(1024, min(self.max_reply_bytes, self.outgoing_queue_bytes) * 7 // 8)


def feed_matches(rule: str, feed: str) -> bool:
    """A rule is a feed's name, or a prefix ending in `*`."""
    return feed.startswith(rule[:-1]) if rule.endswith("*") else feed == rule


def feed_is_public(feed: str, public: Sequence[str]) -> bool:
    return any(feed_matches(rule, feed) for rule in public)


def first_within(values: Sequence[Any], budget: int) -> tuple[bytes, bool]:
    """`values` as a JSON array of at most `budget` bytes, keeping the first ones; whether
    any were left out. The whole list is encoded once: in the common case it fits."""
    encoded = orjson.dumps(values)
    if len(encoded) <= budget:
        return encoded, False
    kept: list[bytes] = []
    size = 2
    for value in values:
        entry = orjson.dumps(value)
        size += len(entry) + 1
        if size > budget:
            break
        kept.append(entry)
    return b"[" + b",".join(kept) + b"]", True


def newest_within(frames: Sequence[bytes], budget: int) -> int:
    """Index of the oldest frame that still fits with all the newer ones in `budget` bytes
    (at least the newest is kept, so a reader always makes progress)."""
    size = 0
    for index in range(len(frames) - 1, -1, -1):
        size += len(frames[index]) + 1
        if size > budget and index < len(frames) - 1:
            return index + 1
    return 0


class PublishUnconfirmed(Exception):
    """A publish that was delivered to every member but whose storage did not confirm.

    Not "not carried out": the message has its offset and members have it. The caller is
    told the outcome is unknown, with the message's place; a retry with the same
    `client_msg_id` is safe, and the reconciler stores the message without one.
    """

    def __init__(self, code: p.ErrorCode, message: str, room: str, result: PublishResult) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.room = room
        self.offset = result.offset
        self.msg_id = result.msg_id

    def frame(self, command_id: p.CommandId) -> bytes:
        """The `error` reply with `outcome: "unknown"`."""
        return p.unconfirmed_publish(
            command_id, self.code, self.message, self.room, self.offset, self.msg_id
        )


class Node:
    def __init__(
        self,
        *,
        node_id: str,
        broker: Broker,
        presence: Presence,
        sink: MessageSink,
        history: HistoryReader,
        access: RoomAccess,
        limits: NodeLimits | None = None,
        snapshots: dict[str, SnapshotProvider] | None = None,
        reconciler: Reconciler | None = None,
        user_connections: UserConnections | None = None,
        stats_interval: float = 0.0,
    ) -> None:
        self.node_id = node_id
        self.broker = broker
        self.presence = presence
        self.sink = sink
        self.history = history
        self.access = access
        self.limits = limits or NodeLimits()
        self.snapshots = snapshots or {}
        self.reconciler = reconciler
        # Per user across the cluster; the hub counts per node.
        self.user_connections = user_connections or UserConnections()
        # Coalesces each loop turn's direct writes per connection (`realtime.transport`).
        self.outbox = Outbox()
        self.hub = Hub(
            broker,
            max_pending_bytes=self.limits.outgoing_queue_bytes,
            max_backlog_bytes=self.limits.max_backlog_bytes,
            outbox=self.outbox,
        )
        self.hub.control_handlers[CONTROL] = self._on_control
        # Told the id of every user whose sockets are closed by `disconnect_user`, on this
        # node or another (the account's credentials no longer hold): caches forget it.
        self.user_listeners: list[Callable[[str], None]] = []
        # feed -> (position it was built at, when, encoded snapshot, truncated)
        self._snapshot_cache: dict[str, tuple[Position, float, bytes, bool]] = {}
        self._snapshot_builds: dict[str, asyncio.Future[tuple[bytes, bool]]] = {}
        self._diffs: dict[str, dict[str, tuple[UserInfo, bool]]] = {}
        self._diff_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.closing = False
        self.published = 0
        self.acknowledged = 0  # publishes answered with `ack`: stored, or in the Celery broker
        self.unconfirmed_replies = 0  # delivered, but storage did not confirm in time
        self.delivery_unknown_replies = 0  # the broker's reply to a publish was lost
        self.closed_too_slow = 0  # connections closed with 4408: read slower than the room
        # The built-in `stats` feed, every `stats_interval` seconds; 0 publishes none.
        self.stats_publisher = StatsPublisher(self, stats_interval) if stats_interval > 0 else None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.user_connections.start()
        await self.presence.start()
        await self.sink.start()
        await self.broker.start(self.hub)
        # Without Redis at start the broker still records the subscription and makes it when
        # Redis comes (as for any channel): the node starts either way.
        with contextlib.suppress(BrokerUnavailable):
            await self.broker.subscribe(CONTROL)
        self._sweeper = asyncio.get_running_loop().create_task(self._presence_loop())
        if self.reconciler is not None:
            self.reconciler.start()
        if self.stats_publisher is not None:
            self.stats_publisher.start()

    async def close(self) -> None:
        """Close every connection with 1001 (clients reconnect elsewhere), then the backends."""
        self.closing = True
        if self.stats_publisher is not None:
            await self.stats_publisher.close()
        await self.disconnect_all(p.CloseCode.GOING_AWAY)
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self._flush_diffs()
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(task), 2.0)
        await self.hub.close()
        if self.reconciler is not None:
            await self.reconciler.close()
        await self.sink.close()
        await self.broker.close()
        await self.presence.close()
        await self.user_connections.close()

    async def disconnect_all(self, code: p.CloseCode) -> None:
        connections = list(self.hub.connections.values())
        await asyncio.gather(*(conn.close(code) for conn in connections), return_exceptions=True)
        for conn in connections:
            await self.disconnect(conn)

    # -- metrics (`realtime.stats`) ---------------------------------------------------------------

    def stats(self) -> list[Stat]:
        return self._stats(self.hub.stats())

    async def stats_in_slices(self) -> list[Stat]:
        """The same as `stats`, without holding the loop for a pass over every connection:
        for what runs every second (the stats feed), where `/metrics` runs on a scrape."""
        return self._stats(await self.hub.stats_in_slices())

    def _stats(self, hub: list[Stat]) -> list[Stat]:
        stats = [
            Stat("messages_published", "Messages published through this node", self.published),
            Stat(
                "messages_acknowledged",
                "Publishes answered with an ack: stored (in-process) or in the Celery broker",
                self.acknowledged,
            ),
            Stat(
                "messages_unconfirmed_replies",
                "Publishes delivered whose storage did not confirm: answered outcome unknown",
                self.unconfirmed_replies,
            ),
            Stat(
                "messages_delivery_unknown_replies",
                "Publishes whose broker reply was lost (Redis stalled or dropped the "
                "connection): answered delivery unknown",
                self.delivery_unknown_replies,
            ),
            Stat(
                "connections_closed_too_slow",
                "Connections closed with 4408 because their outgoing queue overflowed",
                self.closed_too_slow,
            ),
            gauge("broker_up", "1 when the broker answers", 1.0 if self.broker.healthy else 0.0),
            gauge(
                "persistence_up",
                "1 when the last batch of messages was handed to storage",
                1.0 if self.sink.healthy else 0.0,
            ),
            gauge(
                "rooms",
                "Rooms with members on this node",
                sum(1 for name in self.hub.channels if name.startswith(ROOM)),
            ),
            *hub,
            *self.sink.stats(),
        ]
        if self.reconciler is not None:
            stats.extend(self.reconciler.stats())
        return stats

    # -- connections ---------------------------------------------------------------------------

    def admit(self, user: UserInfo) -> p.CloseCode | None:
        """Why a new connection of `user` may not open now, or None."""
        if self.closing:
            return p.CloseCode.GOING_AWAY
        if len(self.hub.connections) >= self.limits.max_connections:
            return p.CloseCode.TRY_AGAIN_LATER  # this node is full; another may not be
        if self.hub.user_connections.get(user.id, 0) >= self.limits.max_connections_per_user:
            return p.CloseCode.TOO_MANY_CONNECTIONS
        return None

    async def claim(self, user: UserInfo, conn_id: str) -> p.CloseCode | None:
        """Why the cluster refuses one more connection of `user` (4429), or None once it is
        counted. Call after `admit`; `disconnect` gives the place back."""
        limit = self.limits.max_connections_per_user
        try:
            if not await self.user_connections.claim(user.id, conn_id, limit):
                return p.CloseCode.TOO_MANY_CONNECTIONS
        except UserConnectionsUnavailable as exc:
            # The node's own cap still holds; refusing everyone during an outage would not.
            log.warning("cluster-wide connection count unavailable, admitting: %s", exc)
        return None

    async def release(self, user: UserInfo, conn_id: str) -> None:
        """Give back a place taken by `claim` (its entry would expire anyway)."""
        # Unreachable: the entry expires within its lifetime by itself.
        with contextlib.suppress(UserConnectionsUnavailable):
            await self.user_connections.release(user.id, conn_id)

    def _count_close(self, conn: Connection) -> None:
        if conn.close_code == p.CloseCode.TOO_SLOW:
            self.closed_too_slow += 1

    def connect(self, conn: Connection) -> bytes:
        """Register a connection; its welcome frame."""
        self.hub.add_connection(conn)
        conn.on_close = self._count_close
        self._expire_at(conn, conn.user.expires_at)
        return p.welcome(
            conn.conn_id,
            self.node_id,
            conn.user,
            _number(self.limits.heartbeat),
            {
                "max_body_bytes": self.limits.max_body_bytes,
                "rate": _number(self.limits.rate),
                "burst": self.limits.burst,
            },
        )

    async def disconnect(self, conn: Connection) -> None:
        """The socket is gone: leave everything it joined, announcing leaves."""
        if conn.conn_id not in self.hub.connections:
            return
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        for name in list(conn.joined):
            self.hub.remove_member(name, conn)
            if name.startswith(ROOM):
                await self._presence_leave(name[len(ROOM) :], conn)
        self.hub.remove_connection(conn)
        await self.release(conn.user, conn.conn_id)

    # -- tokens and accounts -------------------------------------------------------------------

    def _expire_at(self, conn: Connection, expires_at: float | None) -> None:
        """Close the connection with 4401 ("get a new token") when its token expires."""
        if conn.expiry is not None:
            conn.expiry.cancel()
            conn.expiry = None
        if expires_at is None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, expires_at - time.time())
        conn.expiry = loop.call_later(delay, conn.close_soon, p.CloseCode.UNAUTHORIZED)

    def refresh(self, conn: Connection, command: p.Refresh, user: UserInfo | None) -> bytes:
        """Carry the connection on under a new token (`user` as it names it, None if invalid)."""
        if user is None or user.id != conn.user.id:
            raise p.ProtocolError(
                p.ErrorCode.UNAUTHORIZED,
                "the token is invalid, expired or names another user; the connection keeps "
                "its old one",
                command.id,
            )
        # The name on the wire stays the one presence and messages already show.
        conn.user = dataclasses.replace(conn.user, role=user.role, expires_at=user.expires_at)
        self._expire_at(conn, user.expires_at)
        return p.refreshed(command.id, user.expires_at)

    async def disconnect_user(
        self, user_id: str, code: p.CloseCode | int = p.CloseCode.UNAUTHORIZED
    ) -> None:
        """Close every socket of `user_id`, on every node of the cluster, with `code`.

        For an account deleted or a password changed: tokens issued before may still be
        valid, and an open socket would otherwise outlive them. This node's sockets close at
        once; the others are told through the broker's control channel. Raises
        BrokerUnavailable when the other nodes could not be told.
        """
        self._close_user(user_id, int(code))
        frame = orjson.dumps({"type": "disconnect_user", "user": user_id, "code": int(code)})
        await self.broker.publish_event(CONTROL, frame)

    def _close_user(self, user_id: str, code: int) -> None:
        for listener in self.user_listeners:
            listener(user_id)
        if user_id not in self.hub.user_connections:
            return
        for conn in list(self.hub.connections.values()):
            if conn.user.id == user_id:
                conn.close_soon(code)

    def _on_control(self, frame: bytes) -> None:
        try:
            order = orjson.loads(frame)
            if order.get("type") == "disconnect_user":
                self._close_user(str(order["user"]), int(order["code"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            log.warning("ignored a malformed control frame: %r", frame[:64])

    # -- commands ------------------------------------------------------------------------------

    async def handle(self, conn: Connection, command: p.Command) -> bytes | None:
        """Carry out one command; the reply frame (None when the command has none).

        Exhaustive: a command type added to `protocol.Command` and not handled here fails
        type checking (`assert_never`), not silently at run time.
        """
        match command:
            case p.Publish():
                return await self.publish(conn, command)
            case p.Ping():
                return p.pong(command.id)
            case p.Typing():
                return await self.typing(conn, command)
            case p.Join():
                return await self.join(conn, command)
            case p.Leave():
                return await self.leave(conn, command)
            case p.PresenceQuery():
                return await self.presence_query(conn, command)
            case p.History():
                return await self.history_query(conn, command)
            case p.Subscribe():
                return await self.subscribe(conn, command)
            case p.Unsubscribe():
                return await self.unsubscribe(conn, command)
            case p.Refresh():
                # The endpoint checks the token (it holds the authenticator) and calls
                # `refresh`; one that reaches here is a wiring bug.
                raise p.ProtocolError(p.ErrorCode.INTERNAL, "refresh is handled by the endpoint")
            case _:
                assert_never(command)

    async def _check_access(
        self, room: str, user: UserInfo, command_id: p.CommandId, *, read_only: bool = False
    ) -> None:
        if read_only:
            allowed = await self.access.can_read(room, user)
        else:
            allowed = await self.access.can_access(room, user)
        if not allowed:
            raise p.ProtocolError(
                p.ErrorCode.FORBIDDEN, f"you are not a member of room '{room}'", command_id
            )

    def _check_channel_cap(self, conn: Connection, command_id: p.CommandId) -> None:
        cap = self.limits.max_channels_per_connection
        if len(conn.joined) >= cap:
            raise p.ProtocolError(
                p.ErrorCode.TOO_MANY_CHANNELS,
                f"at most {cap} rooms and feeds per connection; leave one first",
                command_id,
            )

    def _rejoined(self, conn: Connection, command: p.Join, channel: str) -> bytes:
        """A repeat join, answered from this node's state: nothing changes, so no backend
        is asked (a client looping on `join` costs the node a dictionary lookup)."""
        state = self.hub.channels.get(channel)
        member = state.members.get(conn.conn_id) if state is not None else None
        epoch = state.epoch if state is not None and state.epoch is not None else ""
        offset = max(state.offset if state else 0, member.floor if member else 0)
        return p.joined(command.id, command.room, epoch, offset, [], False, [], already_joined=True)

    async def join(self, conn: Connection, command: p.Join) -> bytes:
        room, channel = command.room, ROOM + command.room
        if self.hub.is_member(channel, conn):
            return self._rejoined(conn, command, channel)
        self._check_channel_cap(conn, command.id)
        await self._check_access(room, conn.user, command.id)
        await self.hub.add_member(channel, conn, command.presence_events)
        try:
            if await self.presence.add(room, conn.conn_id, conn.user, self.node_id):
                self._queue_diff(room, conn.user, joined=True)
            reply, position = await self._joined(command, channel)
        except BaseException:
            self.hub.remove_member(channel, conn)
            with contextlib.suppress(Exception):
                await self._presence_leave(room, conn)
            raise
        # The reply goes out before anything that arrived meanwhile (`activate` releases it).
        conn.reply(reply)
        self.hub.activate(channel, conn, position)
        return b""

    async def _joined(self, command: p.Join, channel: str) -> tuple[bytes, Position]:
        """The `joined` reply, and the position it names."""
        position = await self.broker.position(channel)
        members = await self.presence.members(command.room)
        missed, recovered = await self._recover(command.room, channel, command.since, position)
        # A room of thousands would otherwise make every join's reply pass the bound; half
        # the budget is kept for `missed`. The whole list stays on REST (`/rooms/{r}/presence`).
        presence, presence_cut = first_within(
            [m.as_dict() for m in members], self.limits.reply_budget // 2
        )
        if missed and sum(len(f) + 1 for f in missed) + len(presence) > self.limits.reply_budget:
            missed, recovered = [], False  # the client pages through `history` instead
        reply = p.joined(
            command.id,
            command.room,
            position.epoch,
            position.offset,
            presence,
            recovered,
            missed,
            presence_truncated=presence_cut,
        )
        return reply, position

    async def _recover(
        self, room: str, channel: str, since: Position | None, now: Position
    ) -> tuple[list[bytes], bool]:
        """What a client at `since` missed, from the broker's window and then the database.

        `recovered` is true only when the offsets prove the answer complete: one epoch,
        every offset from since+1 to now, each once.
        """
        if since is None or since.epoch != now.epoch or since.offset > now.offset:
            return [], False
        if since.offset == now.offset:
            return [], True
        frames: list[bytes] = []
        size, budget = 0, self.limits.reply_budget
        cursor = since.offset
        while cursor < now.offset and len(frames) < MAX_RECOVERY:
            # The newest messages may not be stored yet (persistence is asynchronous) and the
            # oldest may have left the broker's window: the window first, then the database.
            recent = await self.broker.recent(channel, Position(now.epoch, cursor))
            if recent is not None:
                frames.extend(pub.frame for pub in recent if pub.offset <= now.offset)
                cursor = now.offset
                break
            stored, _ = await self.history.page(
                room, now.epoch, after=cursor, limit=min(200, MAX_RECOVERY - len(frames))
            )
            contiguous = 0
            for message in stored:
                if message.offset != cursor + 1 + contiguous or message.offset > now.offset:
                    break
                frame = orjson.dumps(message.event())
                frames.append(frame)
                size += len(frame) + 1
                contiguous += 1
            if contiguous == 0 or size > budget:
                # Over one reply's budget: `recovered: false`, and the client pages through
                # history (each page bounded too) rather than get everything in one frame.
                return [], False
            cursor += contiguous
        if cursor != now.offset:
            return [], False
        return frames, True

    async def leave(self, conn: Connection, command: p.Leave) -> bytes:
        channel = ROOM + command.room
        if self.hub.remove_member(channel, conn):
            await self._presence_leave(command.room, conn)
        return p.left(command.id, command.room)

    async def publish(self, conn: Connection, command: p.Publish) -> bytes | None:
        if not self.hub.is_member(ROOM + command.room, conn):
            raise p.ProtocolError(
                p.ErrorCode.NOT_JOINED, f"join room '{command.room}' before publishing", command.id
            )
        result, message = await self._accept(conn.user, command)
        # The ack waits for storage; the next command of this connection does not.
        self._spawn(self._ack_when_stored(conn, command, message, result))
        return None

    async def publish_as(self, user: UserInfo, command: p.Publish) -> PublishResult:
        """A publish without a connection: a service's REST call, a script, a Celery task.

        The same path as a member's publish (offset, delivery to every member, storage,
        idempotency by `client_msg_id`), except that the caller is not a member: the room's
        access rule is checked instead. Returns once storage confirmed, as an ack does.

        Raises `ProtocolError` (forbidden), `BrokerUnavailable` (nothing was published) or
        `PublishUnconfirmed` (delivered, but storage did not confirm).
        """
        await self._check_access(command.room, user, command.id)
        result, message = await self._accept(user, command)
        await self._store(command.room, message, result)
        self.acknowledged += 1
        return result

    async def _accept(
        self, user: UserInfo, command: p.Publish
    ) -> tuple[PublishResult, StoredMessage | None]:
        """Give the message its offset and send it to every member (the broker's script);
        the message to store, or None for a retry whose first message needs nothing more."""
        room, channel = command.room, ROOM + command.room
        ts = p.utc_timestamp()
        msg_id = new_msg_id()
        fields = p.message_fields(
            msg_id, command.client_msg_id, user, command.body_json or command.body, ts
        )
        key = f"{user.id}:{command.client_msg_id}" if command.client_msg_id else None
        try:
            result = await self.broker.publish(
                channel,
                kind="message",
                name_key="room",
                msg_id=msg_id,
                fields=fields,
                idempotency_key=key,
                durable=True,
            )
        except BrokerUnavailable as exc:
            if exc.maybe_sent:  # answered `delivery: "unknown"` (WebSocket) or its 503 (REST)
                self.delivery_unknown_replies += 1
            raise
        self.published += 1
        if result.duplicate:
            # A retry: what is stored is the first message, never this retry's body. Its
            # frame is in the window unless it was confirmed stored (then nothing is left to
            # do) or its epoch is over. Storing it again is harmless, and it is what makes
            # the retry's ack mean "stored" after the first attempt's storage failed.
            return result, _message_of(result.frame)
        message = StoredMessage(
            msg_id=result.msg_id,
            room=room,
            epoch=result.epoch,
            offset=result.offset,
            user=user,
            body=command.body,
            client_msg_id=command.client_msg_id,
            ts=ts,
        )
        return result, message

    async def _ack_when_stored(
        self,
        conn: Connection,
        command: p.Publish,
        message: StoredMessage | None,
        result: PublishResult,
    ) -> None:
        """Ack once storage has the message; otherwise say what is known."""
        try:
            await self._store(command.room, message, result)
        except PublishUnconfirmed as exc:
            conn.reply(exc.frame(command.id))
            return
        self.acknowledged += 1
        conn.reply(p.ack(command.id, command.room, result.offset, result.msg_id))

    async def _store(self, room: str, message: StoredMessage | None, result: PublishResult) -> None:
        """Return once storage confirmed `message`; else raise `PublishUnconfirmed`.

        The message went out to every member before this runs, so a failure here must not
        read "not carried out": the error says the outcome is unknown and names the offset.
        The reconciler stores the message from the broker's window either way.
        """
        try:
            if message is not None:
                await self.sink.store(message)
        except SinkUnavailable as exc:
            self.unconfirmed_replies += 1
            raise PublishUnconfirmed(
                p.ErrorCode.UNAVAILABLE,
                f"delivered, but storage did not confirm ({exc}); retry with the same "
                "client_msg_id, or leave it to the server to store",
                room,
                result,
            ) from exc
        except MessageRefused as exc:
            self.unconfirmed_replies += 1
            raise PublishUnconfirmed(
                p.ErrorCode.INTERNAL,
                f"delivered, but the database refused to store it (set aside): {exc}",
                room,
                result,
            ) from exc
        except Exception as exc:
            log.exception("storing message %s failed", result.msg_id)
            self.unconfirmed_replies += 1
            raise PublishUnconfirmed(
                p.ErrorCode.INTERNAL,
                "delivered, but storing it failed; it is retried by the server",
                room,
                result,
            ) from exc

    async def typing(self, conn: Connection, command: p.Typing) -> bytes | None:
        channel = ROOM + command.room
        if not self.hub.is_member(channel, conn):
            raise p.ProtocolError(
                p.ErrorCode.NOT_JOINED, f"join room '{command.room}' first", command.id
            )
        await self.broker.publish_event(
            channel, p.typing_event(command.room, conn.user), exclude_user=conn.user.id
        )
        return None

    async def presence_query(self, conn: Connection, command: p.PresenceQuery) -> bytes:
        if not self.hub.is_member(ROOM + command.room, conn):
            await self._check_access(command.room, conn.user, command.id, read_only=True)
        members = await self.presence.members(command.room)
        encoded, cut = first_within([m.as_dict() for m in members], self.limits.reply_budget)
        return p.presence_reply(command.id, command.room, encoded, members_truncated=cut)

    async def history_query(self, conn: Connection, command: p.History) -> bytes:
        if not self.hub.is_member(ROOM + command.room, conn):
            await self._check_access(command.room, conn.user, command.id, read_only=True)
        # A read creates nothing: a room the broker does not know reads the newest stored
        # epoch (what a restarted memory broker would continue), or nothing at all.
        position = await self.broker.peek_position(ROOM + command.room)
        messages, has_more = await self.history.page(
            command.room,
            position.epoch if position is not None else None,
            before=command.before,
            limit=command.limit,
        )
        frames = [orjson.dumps(m.event()) for m in messages]
        # Oldest first, so a page cut to fit keeps the newest messages: the client asks for
        # the rest with `before` the first offset it got, as for any page with has_more.
        start = newest_within(frames, self.limits.reply_budget)
        if start:
            frames, has_more = frames[start:], True
        return p.history_reply(command.id, command.room, frames, has_more)

    async def presence_members(self, room: str) -> list[Member]:
        return await self.presence.members(room)

    # -- feeds ---------------------------------------------------------------------------------

    def may_subscribe(self, feed: str, user: UserInfo) -> bool:
        """Public feeds for everyone, granted feeds for those they are granted to, every
        feed for services and admins."""
        if user.role in FEED_ROLES or feed_is_public(feed, self.limits.public_feeds):
            return True
        holders = (f"user:{user.id}", f"role:{user.role}")
        return any(
            feed_matches(rule, feed) and not granted.isdisjoint(holders)
            for rule, granted in self.limits.feed_grants
        )

    async def subscribe(self, conn: Connection, command: p.Subscribe) -> bytes:
        feed, channel = command.feed, FEED + command.feed
        if not self.may_subscribe(feed, conn.user):
            raise p.ProtocolError(p.ErrorCode.FORBIDDEN, f"feed '{feed}' is not public", command.id)
        already = self.hub.is_member(channel, conn)
        if not already:
            self._check_channel_cap(conn, command.id)
            await self.hub.add_member(channel, conn)
        try:
            position = await self.broker.position(channel)
            snapshot, truncated = await self._snapshot(feed, channel, position)
            missed, recovered = await self._recover_feed(channel, command.since, position)
        except BaseException:
            if not already:
                self.hub.remove_member(channel, conn)
            raise
        if missed and sum(len(f) + 1 for f in missed) + len(snapshot) > self.limits.reply_budget:
            missed, recovered = [], False  # the snapshot is the current state anyway
        reply = p.subscribed(
            command.id,
            feed,
            position.epoch,
            position.offset,
            snapshot,
            recovered,
            missed,
            snapshot_truncated=truncated,
        )
        if already:
            return reply
        conn.reply(reply)
        self.hub.activate(channel, conn, position)
        return b""

    async def _snapshot(self, feed: str, channel: str, position: Position) -> tuple[bytes, bool]:
        """The feed's snapshot, encoded and cut to one reply's budget; whether it was cut.

        A provider's snapshot (the items, from the database) is built once per change of the
        feed, not once per subscribe, and concurrent subscribes share one build.
        """
        provider = self.snapshots.get(feed)
        if provider is None:
            frame = await self.broker.last_frame(channel)
            if frame is None:
                return b"null", False
            return self._fit_snapshot(orjson.loads(frame).get("data"))
        cached = self._snapshot_cache.get(feed)
        now = time.monotonic()
        if cached is not None and cached[0] == position and now - cached[1] < SNAPSHOT_MAX_AGE:
            return cached[2], cached[3]
        build = self._snapshot_builds.get(feed)
        if build is None:
            build = asyncio.ensure_future(self._build_snapshot(feed, provider, position, now))
            self._snapshot_builds[feed] = build
            build.add_done_callback(lambda _: self._snapshot_builds.pop(feed, None))
        return await asyncio.shield(build)

    async def _build_snapshot(
        self, feed: str, provider: SnapshotProvider, position: Position, started: float
    ) -> tuple[bytes, bool]:
        encoded, truncated = self._fit_snapshot(await provider())
        self._snapshot_cache[feed] = (position, started, encoded, truncated)
        return encoded, truncated

    def _fit_snapshot(self, value: Any) -> tuple[bytes, bool]:
        """`value` encoded within the reply budget: a list keeps its last (newest) entries,
        anything else too big becomes null."""
        encoded = orjson.dumps(value)
        budget = self.limits.reply_budget
        if len(encoded) <= budget:
            return encoded, False
        if not isinstance(value, list):
            return b"null", True
        entries = [orjson.dumps(entry) for entry in value]
        start = newest_within(entries, budget)
        if start < len(entries) and len(entries[start]) + 2 > budget:
            start += 1  # a single entry over the budget: better none than one reply too big
        return b"[" + b",".join(entries[start:]) + b"]", True

    async def _recover_feed(
        self, channel: str, since: Position | None, now: Position
    ) -> tuple[list[bytes], bool]:
        if since is None or since.epoch != now.epoch or since.offset > now.offset:
            return [], False
        if since.offset == now.offset:
            return [], True
        recent = await self.broker.recent(channel, since)
        if recent is None:
            return [], False
        return [pub.frame for pub in recent], True

    async def unsubscribe(self, conn: Connection, command: p.Unsubscribe) -> bytes:
        self.hub.remove_member(FEED + command.feed, conn)
        return p.unsubscribed(command.id, command.feed)

    async def publish_feed(self, feed: str, data: Any) -> Position:
        """Publish one update to a feed (the REST API and workers call this)."""
        # A feed's snapshot changes with what is published to it: other nodes see the
        # position move, this one forgets its cached snapshot at once.
        self._snapshot_cache.pop(feed, None)
        result = await self.broker.publish(
            FEED + feed,
            kind="update",
            name_key="feed",
            msg_id=new_msg_id(),
            fields=p.update_fields(data, p.utc_timestamp()),
        )
        return Position(result.epoch, result.offset)

    # -- presence ------------------------------------------------------------------------------

    async def _presence_leave(self, room: str, conn: Connection) -> None:
        try:
            gone = await self.presence.remove(room, conn.conn_id)
        except PresenceUnavailable:
            return  # the entry expires by itself and is announced then
        if gone is not None:
            self._queue_diff(room, gone, joined=False)

    def _queue_diff(self, room: str, user: UserInfo, *, joined: bool) -> None:
        """Gather a join or leave; a join and a leave of one user in one window cancel out."""
        pending = self._diffs.setdefault(room, {})
        previous = pending.get(user.id)
        if previous is not None and previous[1] != joined:
            del pending[user.id]
        else:
            pending[user.id] = (user, joined)
        if self._diff_timer is None:
            loop = asyncio.get_running_loop()
            self._diff_timer = loop.call_later(PRESENCE_COALESCE, self._flush_diffs)

    def _flush_diffs(self) -> None:
        self._diff_timer = None
        diffs, self._diffs = self._diffs, {}
        for room, users in diffs.items():
            if not users:
                continue
            joins = [{"user": u.as_dict(), "connections": 1} for u, j in users.values() if j]
            leaves = [{"user": u.as_dict(), "connections": 0} for u, j in users.values() if not j]
            frame = p.presence_diff(room, joins, leaves)
            self._spawn(self._publish_event(ROOM + room, frame))

    async def _publish_event(self, channel: str, frame: bytes) -> None:
        try:
            await self.broker.publish_event(channel, frame, presence=True)
        except BrokerUnavailable:
            log.warning("presence event for %s not sent: broker unavailable", channel)

    async def _presence_loop(self) -> None:
        """Keep this node's entries fresh and announce the users of nodes that died."""
        timeout = self.limits.presence_timeout
        # Entries expire `presence.timeout` after their last refresh (a fraction of the
        # announced timeout, see `presence_entry_ttl`), refreshed three times within it: a
        # dead node's users are announced within the presence timeout, and a live node may
        # miss two refreshes before its users look dead.
        interval = max(0.05, self.presence.timeout / 3)
        loop = asyncio.get_running_loop()
        # While presence was unreachable no node could refresh anything, so right after an
        # outage longer than the timeout every entry of the cluster looks dead. Expiring then
        # would announce every connected user as gone. Every node has failed a sweep during
        # such an outage (it sweeps three times per timeout), so each holds its expiry back
        # for one timeout after its last failure: by then every live node has refreshed its
        # own entries, and only the dead nodes' are still stale.
        expire_after = 0.0
        while True:
            await asyncio.sleep(interval)
            entries = [
                (name[len(ROOM) :], conn.conn_id)
                for conn in list(self.hub.connections.values())
                for name in conn.joined
                if name.startswith(ROOM)
            ]
            try:
                missing: list[tuple[str, str]] = []
                async for part in in_slices(entries):
                    missing += await self.presence.refresh(part)
                await self._restore_presence(missing)
                if loop.time() >= expire_after:
                    for room, user in await self.presence.expire():
                        self._queue_diff(room, user, joined=False)
            except PresenceUnavailable:
                expire_after = loop.time() + timeout
                continue
            except Exception:
                log.exception("presence sweep failed")
            try:
                held = [(c.user.id, c.conn_id) for c in list(self.hub.connections.values())]
                async for part in in_slices(held):
                    await self.user_connections.refresh(part)
            except UserConnectionsUnavailable:
                pass  # entries that expire meanwhile only under-count: admission errs open
            except Exception:
                log.exception("refreshing the cluster-wide connection counts failed")

    async def _restore_presence(self, missing: list[tuple[str, str]]) -> None:
        """Add back the entries of live connections that presence no longer has.

        They were lost (Redis restarted without its data) or expired by another node while
        this one could not refresh them (an outage, a stalled event loop). Refreshing never
        brings an entry back, so without this the user would stay out of presence for as long
        as the connection lives. A user who thereby joins again is announced.
        """
        for room, conn_id in missing:
            conn = self.hub.connections.get(conn_id)
            channel = ROOM + room
            if conn is None or channel not in conn.joined:
                continue  # it left meanwhile: nothing to restore
            if await self.presence.add(room, conn_id, conn.user, self.node_id):
                self._queue_diff(room, conn.user, joined=True)
            if channel not in conn.joined:
                # It left while its entry was being added: its own removal may have come
                # first, so remove the entry again rather than leave a ghost behind.
                await self._presence_leave(room, conn)

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _message_of(frame: bytes) -> StoredMessage | None:
    """The message of a frame from the broker's window; None when there is none."""
    if not frame:
        return None
    try:
        return StoredMessage.from_event(orjson.loads(frame))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.error("a duplicate's first frame is not a message: %r", frame[:200])
        return None


def _number(value: float) -> float | int:
    """25, not 25.0, on the wire when a setting is whole, as PROTOCOL.md writes it."""
    return int(value) if float(value).is_integer() else value


def presence_entry_ttl(presence_timeout: float) -> float:
    """How long a presence entry lives unrefreshed, so that a dead connection's leave is
    announced within `presence_timeout`: expiry, plus at most one sweep interval (a third
    of the entry's life), plus the presence-diff coalescing, must fit."""
    return max(0.1, (presence_timeout - PRESENCE_COALESCE) * 0.75)


def new_conn_id(node_id: str) -> str:
    """Unique across nodes: presence entries from every node share one namespace."""
    return f"{node_id}/{os.urandom(8).hex()}"
