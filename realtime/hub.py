"""This node's connections and what they have joined; fan-out of broker traffic to them.

The hub knows nothing of commands or storage. It keeps, per channel (`room:<name>` or
`feed:<name>`), the local members and the last offset this node delivered, and turns each
publication into one frame handed to every member: one framing per message per node, no
task or copy per member.

Ordering and gaps: the broker delivers one channel's publications in offset order. When the
hub sees an offset jump (a lost pub/sub message) or the broker reports a reconnect, it pauses
the channel, fetches what it missed from the broker's recent window, delivers that, and goes
on; when the window no longer reaches back it closes the channel's members with 1011 so they
reconnect and recover from the durable store.

Both places where frames wait are bounded in bytes, because both grow with a room's traffic
while a backend is slow: what is held for a member whose reply is not out yet (past the
outgoing queue's bound the member is closed with 4408) and a recovering channel's backlog
(past its bound the members are sent to recover, as when the window does not reach back).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from realtime.broker import Broker, BrokerUnavailable, Publication
from realtime.connection import Connection
from realtime.protocol import CloseCode
from realtime.stats import Stat, gauge
from realtime.transport import Outbox, Outgoing
from realtime.types import Position

log = logging.getLogger("collab.realtime")

T = TypeVar("T")


# Periodic work over every connection (the stats feed, the presence sweep) runs a slice at a
# time: a message that arrives meanwhile waits for one slice, not for all of them (at 2,000
# connections a whole pass held the loop 3-10 ms, and the message's every delivery with it).
SLICE = 256


async def in_slices(items: list[T]) -> AsyncIterator[list[T]]:
    """`items` in slices of `SLICE`, the event loop free to serve others between two."""
    for start in range(0, len(items), SLICE):
        if start:
            await asyncio.sleep(0)
        yield items[start : start + SLICE]


@dataclass(slots=True)
class Member:
    conn: Connection
    # Deliver only offsets above this one: the position the member's `joined` reply named.
    floor: int = 0
    # Until the member's joined/subscribed reply is sent, deliveries wait here.
    pending: list[tuple[int, Outgoing]] | None = field(default_factory=list)
    pending_bytes: int = 0
    presence_events: bool = True
    # The epochs resets voided while this member was still joining: a reply naming one is
    # void too, a reply naming a newer one (read after a failover) is good.
    voided_epochs: tuple[str, ...] = ()
    # Set when the channel started anew (after a reset) while this member was joining: what
    # the node dropped before that start is not held for it, so its floor must not be below.
    start: Position | None = None


@dataclass(slots=True)
class _Census:
    """What the gauges over every connection and member add up to."""

    backed_up: int = 0
    direct: int = 0
    unsent: int = 0
    join_buffer: int = 0

    def count(self, connections: Iterable[Connection], members: Iterable[Member]) -> None:
        for conn in connections:
            self.backed_up += conn.backed_up
            self.direct += conn.writes_directly
            self.unsent += conn.unsent_bytes()
        for member in members:
            self.join_buffer += member.pending_bytes


@dataclass(slots=True)
class Channel:
    name: str
    members: dict[str, Member] = field(default_factory=dict)
    epoch: str | None = None
    offset: int = 0
    recovering: bool = False
    # After a reset, until a member's reply names the channel's new start: nothing published
    # is delivered or held (no member follows the stream), see `activate`.
    voided: bool = False
    resets: int = 0  # a recovery asked before the last reset answers for a stream gone
    backlog: list[Publication] = field(default_factory=list)
    backlog_bytes: int = 0


class Hub:
    """Local membership and fan-out; the broker handler of this node."""

    def __init__(
        self,
        broker: Broker,
        *,
        max_pending_bytes: int = 1024 * 1024,
        max_backlog_bytes: int = 8 * 1024 * 1024,
        outbox: Outbox | None = None,
    ) -> None:
        """`outbox`: the node's, which decides whether a fan-out writes through (see
        `realtime.transport`); without one, every frame waits for its connection's flush."""
        self.broker = broker
        self.outbox = outbox
        self.channels: dict[str, Channel] = {}
        self.connections: dict[str, Connection] = {}
        self.user_connections: dict[str, int] = {}
        self.opened = 0  # connections added since start, and removed
        self.closed = 0
        self._sub_ops: dict[str, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.deliveries = 0
        # What a joining member may have held for it, and a recovering channel's backlog:
        # both grow with the room's traffic while a backend answers slowly, so both are
        # bounded, and their overflows counted for /metrics.
        self.max_pending_bytes = max_pending_bytes
        self.max_backlog_bytes = max_backlog_bytes
        self.pending_overflows = 0
        self.backlog_overflows = 0
        # Node-wide channels (no members): their events go to these callbacks.
        self.control_handlers: dict[str, Callable[[bytes], None]] = {}

    # -- connections ---------------------------------------------------------------------------

    def add_connection(self, conn: Connection) -> None:
        self.opened += 1
        self.connections[conn.conn_id] = conn
        self.user_connections[conn.user.id] = self.user_connections.get(conn.user.id, 0) + 1

    def remove_connection(self, conn: Connection) -> None:
        if self.connections.pop(conn.conn_id, None) is None:
            return
        self.closed += 1
        left = self.user_connections.get(conn.user.id, 1) - 1
        if left > 0:
            self.user_connections[conn.user.id] = left
        else:
            self.user_connections.pop(conn.user.id, None)

    # -- membership ----------------------------------------------------------------------------

    def _chain(self, name: str, op: Callable[[], Awaitable[None]]) -> asyncio.Task[None]:
        """Run subscribe/unsubscribe of one channel strictly in call order.

        Without it, a last member leaving and a new first member joining at once could reach
        the broker as subscribe-then-unsubscribe and leave the node deaf to the channel.
        """
        previous = self._sub_ops.get(name)

        async def run() -> None:
            if previous is not None:
                with contextlib.suppress(Exception):
                    await previous
            await op()

        task = asyncio.get_running_loop().create_task(run())
        self._sub_ops[name] = task

        def forget(done: asyncio.Task[None]) -> None:
            if self._sub_ops.get(name) is done:
                del self._sub_ops[name]
            if not done.cancelled() and done.exception() is not None:
                log.warning("broker (un)subscribe of %s failed: %s", name, done.exception())

        task.add_done_callback(forget)
        return task

    async def add_member(self, name: str, conn: Connection, presence_events: bool = True) -> Member:
        """Make `conn` a member of channel `name`, subscribing the node if it is the first.

        The member starts *pending*: what arrives is held until `activate` (after the caller
        has sent its reply), so nothing published meanwhile is lost or sent before the reply.
        Raises BrokerUnavailable when the node cannot subscribe.
        """
        channel = self.channels.get(name)
        if channel is None:
            channel = Channel(name)
            self.channels[name] = channel
        member = Member(conn, presence_events=presence_events)
        channel.members[conn.conn_id] = member
        conn.joined.add(name)
        subscribing = self._sub_ops.get(name)
        if len(channel.members) == 1 or subscribing is not None:
            if len(channel.members) == 1:
                subscribing = self._chain(name, lambda: self.broker.subscribe(name))
            assert subscribing is not None
            try:
                await asyncio.shield(subscribing)
            except Exception as exc:
                self.remove_member(name, conn)
                raise BrokerUnavailable(str(exc)) from exc
        return member

    def activate(self, name: str, conn: Connection, floor: Position) -> None:
        """The reply went out: deliver what waited (above `floor`), then deliver live."""
        channel = self.channels.get(name)
        member = channel.members.get(conn.conn_id) if channel else None
        if channel is None or member is None:
            return
        if floor.epoch in member.voided_epochs:
            member.pending, member.pending_bytes = None, 0
            conn.close_soon(CloseCode.INTERNAL_ERROR, "stream interrupted, recover")
            return
        if member.start is not None and (
            floor.epoch != member.start.epoch or floor.offset < member.start.offset
        ):
            member.pending, member.pending_bytes = None, 0
            conn.close_soon(CloseCode.INTERNAL_ERROR, "stream interrupted, recover")
            return
        if channel.voided:
            # The first member since a reset (a client that rejoined right after a failover,
            # before this node heard of it): its position is the channel's new start. What
            # was published after it and dropped here, or never reached this node, comes
            # from the broker's window; if the window cannot give it, it is sent off too.
            channel.voided, channel.recovering = False, False
            channel.epoch, channel.offset = floor.epoch, max(floor.offset, 0)
            member.floor = floor.offset
            member.pending, member.pending_bytes = None, 0
            start = Position(floor.epoch, channel.offset)
            for other in channel.members.values():
                if other.pending is not None:
                    other.start = start
            self._spawn(self._recover(channel))
            return
        if channel.epoch is None or channel.epoch != floor.epoch:
            # The channel's first position on this node, or the member saw a newer epoch.
            channel.epoch, channel.offset = floor.epoch, max(floor.offset, 0)
        # A floor above the channel's offset is NOT taken as the channel's offset: the member
        # read its position on another connection than the pub/sub one, so the publications
        # in between may still be on their way here, and the members already there need them
        # (the offset is what this node has delivered; skipping ahead would drop them as
        # "seen", or hide a real gap from recovery). The member's floor filters them for it.
        member.floor = floor.offset
        waiting, member.pending, member.pending_bytes = member.pending or [], None, 0
        for offset, out in waiting:
            if offset > member.floor:
                conn.deliver(out)

    def remove_member(self, name: str, conn: Connection) -> bool:
        """Forget a membership; unsubscribe the node when it was the last. False if not a member."""
        conn.joined.discard(name)
        channel = self.channels.get(name)
        if channel is None or channel.members.pop(conn.conn_id, None) is None:
            return False
        if not channel.members:
            del self.channels[name]
            self._chain(name, lambda: self.broker.unsubscribe(name))
        return True

    def is_member(self, name: str, conn: Connection) -> bool:
        return name in conn.joined

    # -- broker handler ------------------------------------------------------------------------

    def stats(self) -> list[Stat]:
        """This node's connections and fan-out (`realtime.stats`)."""
        census = _Census()
        census.count(self.connections.values(), self._members())
        return self._stats(census)

    async def stats_in_slices(self) -> list[Stat]:
        """The same figures, counted a slice of connections per loop turn (`in_slices`)."""
        census = _Census()
        async for part in in_slices(list(self.connections.values())):
            census.count(part, ())
        async for members in in_slices(self._members()):
            census.count((), members)
        return self._stats(census)

    def _members(self) -> list[Member]:
        return [m for c in self.channels.values() for m in c.members.values()]

    def _stats(self, census: _Census) -> list[Stat]:
        channels = list(self.channels.values())
        return [
            gauge("connections", "Open WebSocket connections on this node", len(self.connections)),
            gauge("channels", "Rooms and feeds with members on this node", len(channels)),
            gauge(
                "backed_up_connections",
                "Connections whose outgoing queue is not empty",
                census.backed_up,
            ),
            gauge(
                "direct_write_connections",
                "Connections whose frames are written straight to the transport, not via ASGI send",
                census.direct,
            ),
            gauge(
                "outgoing_queue_bytes",
                "Bytes given to connections and not yet taken by their peers (queues, buffers)",
                census.unsent,
            ),
            Stat("deliveries", "Frames handed to local members by the fan-out", self.deliveries),
            Stat(
                "join_buffer_overflows",
                "Joining members closed with 4408: more arrived before their reply than the bound",
                self.pending_overflows,
            ),
            gauge(
                "join_buffer_bytes",
                "Bytes held for members whose join or subscribe reply is not out yet",
                census.join_buffer,
            ),
            Stat(
                "recovery_backlog_overflows",
                "Channels whose gap-recovery backlog passed its bound (members sent to recover)",
                self.backlog_overflows,
            ),
            gauge(
                "recovery_backlog_bytes",
                "Bytes held by channels recovering a gap",
                sum(c.backlog_bytes for c in channels),
            ),
        ]

    def on_publication(self, publication: Publication) -> None:
        channel = self.channels.get(publication.channel)
        if channel is None:
            return
        if channel.voided:
            return  # nobody follows this stream; a new start recovers from the window
        if channel.recovering:
            self._add_backlog(channel, publication)
            return
        if channel.epoch == publication.epoch:
            if publication.offset <= channel.offset:
                # Seen already by the active members; a member still joining may have read
                # an older position than the one that set the channel's offset (two first
                # joins at once), so it still gets the frame, and its floor decides.
                self._hold_for_joiners(channel, publication)
                return
            if publication.offset > channel.offset + 1:
                self._add_backlog(channel, publication)
                self._spawn(self._recover(channel))
                return
        elif channel.epoch is not None and channel.offset > 0:
            # The broker lost the channel's counter: every position clients hold is void.
            self._reset(channel, f"the broker started a new epoch {publication.epoch}")
            return
        self._deliver(channel, publication)

    def _add_backlog(self, channel: Channel, publication: Publication) -> None:
        channel.backlog_bytes += len(publication.frame)
        if channel.backlog_bytes > self.max_backlog_bytes:
            # The gap is not closing fast enough to hold what keeps coming: the members
            # reconnect and recover, each from its own position.
            self.backlog_overflows += 1
            self._reset(channel, f"a gap held over {self.max_backlog_bytes} bytes waiting")
            return
        channel.backlog.append(publication)

    def _hold(self, member: Member, offset: int, out: Outgoing) -> None:
        """Keep a frame for a member whose reply is not out yet, within the queue's bound."""
        assert member.pending is not None
        if member.conn.closing:
            return
        member.pending_bytes += len(out.payload)
        if member.pending_bytes > self.max_pending_bytes:
            # As if its queue overflowed: 4408, and it recovers from its position on reconnect.
            self.pending_overflows += 1
            member.pending, member.pending_bytes = [], 0
            member.conn.close_soon(CloseCode.TOO_SLOW)
            return
        member.pending.append((offset, out))

    def _hold_for_joiners(self, channel: Channel, publication: Publication) -> None:
        out: Outgoing | None = None
        for member in channel.members.values():
            if member.pending is not None:
                out = out or Outgoing(publication.frame)
                self._hold(member, publication.offset, out)

    def _outgoing(self, frame: bytes) -> Outgoing:
        """A frame about to go to a channel's members, written through unless in a burst."""
        outbox = self.outbox
        return Outgoing(frame, now=outbox is not None and outbox.fanout())

    def _deliver(self, channel: Channel, publication: Publication) -> None:
        channel.epoch, channel.offset = publication.epoch, publication.offset
        out = self._outgoing(publication.frame)  # framed once, however many members get it
        offset = publication.offset
        count = 0
        for member in channel.members.values():
            if member.pending is not None:
                self._hold(member, offset, out)
            elif offset > member.floor:
                member.conn.deliver(out)
                count += 1
        self.deliveries += count

    def on_event(self, channel_name: str, frame: bytes, exclude_user: str | None) -> None:
        channel = self.channels.get(channel_name)
        if channel is None:
            control = self.control_handlers.get(channel_name)
            if control is not None:
                control(frame)
            return
        out = self._outgoing(frame)
        for member in channel.members.values():
            if member.pending is not None:
                continue  # its reply carries the state this event would change
            if exclude_user is not None and member.conn.user.id == exclude_user:
                continue
            member.conn.deliver(out)

    def on_presence(self, channel_name: str, frame: bytes) -> None:
        channel = self.channels.get(channel_name)
        if channel is None:
            return
        out = self._outgoing(frame)
        for member in channel.members.values():
            # A pending member's reply carries the presence this event would change.
            if member.pending is None and member.presence_events:
                member.conn.deliver(out)

    def on_resubscribed(self, channels: list[str]) -> None:
        for name in channels:
            channel = self.channels.get(name)
            if channel is not None and channel.epoch is not None:
                self._spawn(self._recover(channel))

    async def _recover(self, channel: Channel) -> None:
        """Fill a gap from the broker's window, or send the members off to recover."""
        if channel.recovering or channel.epoch is None:
            return
        channel.recovering = True
        resets = channel.resets
        try:
            missed = await self.broker.recent(channel.name, Position(channel.epoch, channel.offset))
        except BrokerUnavailable:
            missed = None
        if self.channels.get(channel.name) is not channel or channel.resets != resets:
            # Reset meanwhile: the answer is about a stream nobody follows any more, and the
            # channel's next start runs a recovery of its own (`activate`).
            return
        channel.recovering = False
        if missed is None:
            self._reset(channel, f"the broker's window no longer holds offset {channel.offset + 1}")
            return
        backlog, channel.backlog, channel.backlog_bytes = channel.backlog, [], 0
        for publication in sorted([*missed, *backlog], key=lambda p: p.offset):
            if publication.epoch == channel.epoch and publication.offset == channel.offset + 1:
                self._deliver(channel, publication)

    def _reset(self, channel: Channel, why: str) -> None:
        """Positions on this channel can no longer be continued: members reconnect and recover.

        A member still joining is judged on activation, by the position its reply names: one
        read in the voided epoch is sent off like the others, one read in a newer epoch (a
        client that rejoins right after a failover, before this node has heard of it) is the
        channel's new start, and is not sent off for a stream it never had."""
        log.warning(
            "channel %s lost continuity (%s); asking its members to recover", channel.name, why
        )
        voided, channel.epoch, channel.offset = channel.epoch, None, 0
        channel.voided = True
        channel.resets += 1
        channel.backlog.clear()
        channel.backlog_bytes = 0
        for member in list(channel.members.values()):
            if member.pending is None:
                member.conn.close_soon(CloseCode.INTERNAL_ERROR, "stream interrupted, recover")
            else:
                # What it held belongs to the voided stream.
                member.pending, member.pending_bytes = [], 0
                if voided is not None:
                    member.voided_epochs += (voided,)

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks) + list(self._sub_ops.values()):
            task.cancel()
        for task in list(self._tasks) + list(self._sub_ops.values()):
            with contextlib.suppress(BaseException):
                await task
