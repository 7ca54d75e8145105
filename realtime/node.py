"""The node: every command of docs/PROTOCOL.md carried out over the hub and the backends.

`Node` is the centre of the realtime core. It starts with whatever backends it is given
(memory ones for one process, Redis ones for many) and the storage interfaces that
`persistence` implements. The endpoints only move frames between sockets and `Node.handle`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson

from realtime import protocol as p
from realtime.broker import Broker, BrokerUnavailable, PublishResult
from realtime.connection import Connection
from realtime.hub import Hub
from realtime.presence import Member, Presence, PresenceUnavailable
from realtime.reconciler import Reconciler
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

log = logging.getLogger("collab.realtime")

ROOM = "room:"
FEED = "feed:"
ITEMS_FEED = "items"
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
        self.hub = Hub(broker)
        # Coalesces each loop turn's direct writes per connection (`realtime.transport`).
        self.outbox = Outbox()
        self._diffs: dict[str, dict[str, tuple[UserInfo, bool]]] = {}
        self._diff_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        self.closing = False
        self.published = 0
        self.acknowledged = 0  # publishes answered with `ack`: stored, or in the Celery broker
        self.unconfirmed_replies = 0  # delivered, but storage did not confirm in time
        self.closed_too_slow = 0  # connections closed with 4408: read slower than the room

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        await self.presence.start()
        await self.sink.start()
        await self.broker.start(self.hub)
        self._sweeper = asyncio.get_running_loop().create_task(self._presence_loop())
        if self.reconciler is not None:
            self.reconciler.start()

    async def close(self) -> None:
        """Close every connection with 1001 (clients reconnect elsewhere), then the backends."""
        self.closing = True
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

    async def disconnect_all(self, code: p.CloseCode) -> None:
        connections = list(self.hub.connections.values())
        await asyncio.gather(*(conn.close(code) for conn in connections), return_exceptions=True)
        for conn in connections:
            await self.disconnect(conn)

    # -- connections ---------------------------------------------------------------------------

    def admit(self, user: UserInfo) -> p.CloseCode | None:
        """Why a new connection of `user` may not open now, or None."""
        if self.closing:
            return p.CloseCode.GOING_AWAY
        if len(self.hub.connections) >= self.limits.max_connections:
            # RFC 6455 "try again later": this node is full, another may not be.
            return p.CloseCode.TRY_AGAIN_LATER
        if self.hub.user_connections.get(user.id, 0) >= self.limits.max_connections_per_user:
            return p.CloseCode.TOO_MANY_CONNECTIONS
        return None

    def _count_close(self, conn: Connection) -> None:
        if conn.close_code == p.CloseCode.TOO_SLOW:
            self.closed_too_slow += 1

    def connect(self, conn: Connection) -> bytes:
        """Register a connection; its welcome frame."""
        self.hub.add_connection(conn)
        conn.on_close = self._count_close
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
        for name in list(conn.joined):
            self.hub.remove_member(name, conn)
            if name.startswith(ROOM):
                await self._presence_leave(name[len(ROOM) :], conn)
        self.hub.remove_connection(conn)

    # -- commands ------------------------------------------------------------------------------

    async def handle(self, conn: Connection, command: p.Command) -> bytes | None:
        """Carry out one command; the reply frame (None when the command has none)."""
        if isinstance(command, p.Publish):
            return await self.publish(conn, command)
        if isinstance(command, p.Ping):
            return p.pong(command.id)
        if isinstance(command, p.Typing):
            return await self.typing(conn, command)
        if isinstance(command, p.Join):
            return await self.join(conn, command)
        if isinstance(command, p.Leave):
            return await self.leave(conn, command)
        if isinstance(command, p.PresenceQuery):
            return await self.presence_query(conn, command)
        if isinstance(command, p.History):
            return await self.history_query(conn, command)
        if isinstance(command, p.Subscribe):
            return await self.subscribe(conn, command)
        return await self.unsubscribe(conn, command)

    async def _check_access(self, room: str, user: UserInfo, command_id: p.CommandId) -> None:
        if not await self.access.can_access(room, user):
            raise p.ProtocolError(
                p.ErrorCode.FORBIDDEN, f"you are not a member of room '{room}'", command_id
            )

    async def join(self, conn: Connection, command: p.Join) -> bytes:
        room, channel = command.room, ROOM + command.room
        await self._check_access(room, conn.user, command.id)
        if self.hub.is_member(channel, conn):
            return (await self._joined(command, channel))[0]
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
        reply = p.joined(
            command.id,
            command.room,
            position.epoch,
            position.offset,
            [m.as_dict() for m in members],
            recovered,
            missed,
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
                frames.append(orjson.dumps(message.event()))
                contiguous += 1
            if contiguous == 0:
                break
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
        result = await self.broker.publish(
            channel,
            kind="message",
            name_key="room",
            msg_id=msg_id,
            fields=fields,
            idempotency_key=key,
            durable=True,
        )
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
            await self._check_access(command.room, conn.user, command.id)
        members = await self.presence.members(command.room)
        return p.presence_reply(command.id, command.room, [m.as_dict() for m in members])

    async def history_query(self, conn: Connection, command: p.History) -> bytes:
        if not self.hub.is_member(ROOM + command.room, conn):
            await self._check_access(command.room, conn.user, command.id)
        position = await self.broker.position(ROOM + command.room)
        messages, has_more = await self.history.page(
            command.room, position.epoch, before=command.before, limit=command.limit
        )
        return p.history_reply(
            command.id, command.room, [orjson.dumps(m.event()) for m in messages], has_more
        )

    async def presence_members(self, room: str) -> list[Member]:
        return await self.presence.members(room)

    # -- feeds ---------------------------------------------------------------------------------

    async def subscribe(self, conn: Connection, command: p.Subscribe) -> bytes:
        feed, channel = command.feed, FEED + command.feed
        already = self.hub.is_member(channel, conn)
        if not already:
            await self.hub.add_member(channel, conn)
        try:
            position = await self.broker.position(channel)
            snapshot = await self._snapshot(feed, channel)
            missed, recovered = await self._recover_feed(channel, command.since, position)
        except BaseException:
            if not already:
                self.hub.remove_member(channel, conn)
            raise
        reply = p.subscribed(
            command.id, feed, position.epoch, position.offset, snapshot, recovered, missed
        )
        if already:
            return reply
        conn.reply(reply)
        self.hub.activate(channel, conn, position)
        return b""

    async def _snapshot(self, feed: str, channel: str) -> bytes:
        provider = self.snapshots.get(feed)
        if provider is not None:
            return orjson.dumps(await provider())
        frame = await self.broker.last_frame(channel)
        if frame is None:
            return b"null"
        return orjson.dumps(orjson.loads(frame).get("data"))

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
        result = await self.broker.publish(
            FEED + feed,
            kind="update",
            name_key="feed",
            msg_id=new_msg_id(),
            fields=p.update_fields(data, p.utc_timestamp()),
        )
        return Position(result.epoch, result.offset)

    async def publish_item_change(self, op: str, item: dict[str, Any]) -> None:
        try:
            await self.publish_feed(ITEMS_FEED, {"op": op, "item": item})
        except BrokerUnavailable:
            # The change is committed; dashboards resynchronise from the snapshot on reconnect.
            log.warning("items feed: could not announce %s of item %s", op, item.get("id"))

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
            await self.broker.publish_event(channel, frame)
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
                if entries:
                    await self._restore_presence(await self.presence.refresh(entries))
                if loop.time() >= expire_after:
                    for room, user in await self.presence.expire():
                        self._queue_diff(room, user, joined=False)
            except PresenceUnavailable:
                expire_after = loop.time() + timeout
                continue
            except Exception:
                log.exception("presence sweep failed")

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
