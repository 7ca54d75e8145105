"""The one-node broker (`memory://`): the whole contract of `realtime.broker`, in-process.

Everything here runs on the event loop without awaiting between taking an offset and
delivering the frame, so offset order and delivery order cannot diverge. The only await on the
publish path is the position seed, and state is re-checked after it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from realtime.broker import (
    Broker,
    BrokerHandler,
    PositionSeed,
    Publication,
    PublishResult,
    StorageMark,
    build_frame,
    check_epoch,
    frame_head,
)
from realtime.types import Position, new_epoch

__all__ = ["MemoryBroker"]

log = logging.getLogger(__name__)

# Idempotency keys are remembered for `idempotency_ttl`, but never more than this many at once:
# a flood of unique keys must not grow memory without bound. The oldest go first.
_MAX_IDEMPOTENCY_KEYS = 100_000


@dataclass(slots=True)
class _Channel:
    epoch: str
    offset: int
    window: deque[Publication]
    stored: int  # the storage mark (`realtime.broker.StorageMark`)
    durable: bool = False
    # When the state last became idle-expirable: created, published to, or confirmed.
    touched: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class _Remembered:
    expires: float
    epoch: str
    offset: int
    msg_id: str


@dataclass(slots=True)
class _Idempotency:
    """Keys in insertion order; with one TTL for all, that is also expiry order, so expired
    keys are always at the front and dropping them is cheap."""

    ttl: float
    entries: OrderedDict[tuple[str, str], _Remembered] = field(default_factory=OrderedDict)

    def get(self, channel: str, key: str, now: float) -> _Remembered | None:
        self._drop_expired(now)
        return self.entries.get((channel, key))

    def put(self, channel: str, key: str, remembered: _Remembered) -> None:
        self.entries[(channel, key)] = remembered
        while len(self.entries) > _MAX_IDEMPOTENCY_KEYS:
            self.entries.popitem(last=False)

    def _drop_expired(self, now: float) -> None:
        while self.entries:
            first = next(iter(self.entries.values()))
            if first.expires > now:
                return
            self.entries.popitem(last=False)


class MemoryBroker(Broker):
    """Channels live in this process only; `healthy` is always true."""

    def __init__(
        self,
        history_window: int = 1000,
        idempotency_ttl: float = 86400,
        seed: PositionSeed | None = None,
        max_unconfirmed: int = 100_000,
        state_ttl: float = 0,
    ) -> None:
        if history_window < 1:
            raise ValueError("history_window must be at least 1")
        self.history_window = history_window
        self.idempotency_ttl = idempotency_ttl
        self.max_unconfirmed = max(max_unconfirmed, history_window)
        self.state_ttl = state_ttl
        self._seed = seed
        self._channels: dict[str, _Channel] = {}
        self._subscribed: set[str] = set()
        self._idempotency = _Idempotency(idempotency_ttl)
        self._handler: BrokerHandler | None = None

    async def start(self, handler: BrokerHandler) -> None:
        self._handler = handler

    async def close(self) -> None:
        self._handler = None
        self._subscribed.clear()

    async def subscribe(self, channel: str) -> None:
        self._subscribed.add(channel)

    async def unsubscribe(self, channel: str) -> None:
        self._subscribed.discard(channel)

    async def publish(
        self,
        channel: str,
        *,
        kind: str,
        name_key: str,
        msg_id: str,
        fields: bytes,
        idempotency_key: str | None = None,
        durable: bool = False,
    ) -> PublishResult:
        head = frame_head(kind, name_key, channel)
        state = await self._state(channel)
        state.durable = state.durable or durable
        # No await from here on: the offset taken is the offset delivered, in order.
        if idempotency_key is not None:
            first = self._idempotency.get(channel, idempotency_key, time.monotonic())
            if first is not None:
                return PublishResult(
                    epoch=first.epoch,
                    offset=first.offset,
                    msg_id=first.msg_id,
                    frame=self._frame_at(channel, first.epoch, first.offset),
                    duplicate=True,
                )
        offset = state.offset + 1
        frame = build_frame(head, state.epoch, offset, fields)
        state.offset = offset
        state.touched = time.monotonic()
        publication = Publication(channel=channel, epoch=state.epoch, offset=offset, frame=frame)
        state.window.append(publication)
        self._trim(state)
        if idempotency_key is not None:
            self._idempotency.put(
                channel,
                idempotency_key,
                _Remembered(
                    expires=time.monotonic() + self.idempotency_ttl,
                    epoch=state.epoch,
                    offset=offset,
                    msg_id=msg_id,
                ),
            )
        handler = self._handler
        if handler is not None and channel in self._subscribed:
            try:
                handler.on_publication(publication)
            except Exception:
                log.exception("broker handler failed on a publication to %s", channel)
        return PublishResult(epoch=state.epoch, offset=offset, msg_id=msg_id, frame=frame)

    async def publish_event(
        self,
        channel: str,
        frame: bytes,
        *,
        exclude_user: str | None = None,
        presence: bool = False,
    ) -> None:
        handler = self._handler
        if handler is not None and channel in self._subscribed:
            try:
                if presence:
                    handler.on_presence(channel, frame)
                else:
                    handler.on_event(channel, frame, exclude_user)
            except Exception:
                log.exception("broker handler failed on an event to %s", channel)

    async def position(self, channel: str) -> Position:
        state = await self._state(channel)
        return Position(state.epoch, state.offset)

    async def peek_position(self, channel: str) -> Position | None:
        state = self._live(channel)
        return None if state is None else Position(state.epoch, state.offset)

    async def recent(self, channel: str, since: Position) -> list[Publication] | None:
        state = await self._state(channel)
        if since.epoch != state.epoch or since.offset > state.offset or since.offset < 0:
            return None
        missing = state.offset - since.offset
        if missing == 0:
            return []
        if missing > len(state.window):
            return None
        return list(state.window)[-missing:]

    async def last_frame(self, channel: str) -> bytes | None:
        state = self._live(channel)
        if state is None or not state.window:
            return None
        return state.window[-1].frame

    async def unconfirmed(self, limit: int = 10_000) -> list[str]:
        # The reconciler asks every few seconds: the moment to let idle channels go, as Redis
        # would have expired them.
        for name in [c for c, s in self._channels.items() if self._expired(s)]:
            del self._channels[name]
        found = []
        for channel, state in self._channels.items():
            if state.durable and state.offset > state.stored:
                found.append(channel)
                if len(found) >= limit:
                    break
        return found

    async def storage_mark(self, channel: str) -> StorageMark | None:
        state = self._live(channel)
        if state is None:
            return None
        return StorageMark(state.epoch, state.offset, state.stored)

    async def window(self, channel: str, epoch: str, first: int, last: int) -> list[Publication]:
        state = self._live(channel)
        if state is None or state.epoch != epoch or not state.window:
            return []
        base = state.window[0].offset
        start, stop = max(first - base, 0), min(last - base + 1, len(state.window))
        return [state.window[i] for i in range(start, stop)]

    async def confirm_stored(self, channel: str, epoch: str, offset: int) -> StorageMark | None:
        state = self._live(channel)
        if state is None:
            return None
        if state.epoch == epoch and offset > state.stored:
            state.stored = min(offset, state.offset)
            self._trim(state)
            if state.stored >= state.offset:
                state.touched = time.monotonic()  # idle from now, as Redis's confirm sets it
        return StorageMark(state.epoch, state.offset, state.stored)

    def _trim(self, state: _Channel) -> None:
        """Drop what the window need not keep: beyond the recent `history_window`, only what
        is confirmed stored, unless `max_unconfirmed` are waiting (then the oldest go)."""
        window = state.window
        while len(window) > self.history_window and (
            not state.durable
            or window[0].offset <= state.stored
            or len(window) > self.max_unconfirmed
        ):
            window.popleft()

    @property
    def healthy(self) -> bool:
        return True

    def _expired(self, state: _Channel) -> bool:
        """Idle past `state_ttl`, with nothing unconfirmed held (`realtime.broker`)."""
        if self.state_ttl <= 0 or (state.durable and state.stored < state.offset):
            return False
        return time.monotonic() - state.touched >= self.state_ttl

    def _live(self, channel: str) -> _Channel | None:
        """The channel's state, unless it expired (then it is dropped)."""
        state = self._channels.get(channel)
        if state is not None and self._expired(state):
            del self._channels[channel]
            return None
        return state

    async def _state(self, channel: str) -> _Channel:
        state = self._live(channel)
        if state is not None:
            return state
        seeded = await self._seed(channel) if self._seed is not None else None
        # Another caller may have created the channel while the seed was awaited; theirs wins
        # so that one epoch is ever handed out.
        state = self._live(channel)
        if state is not None:
            return state
        # A seeded position comes from the durable store: everything up to it is stored.
        if seeded is not None:
            state = _Channel(check_epoch(seeded.epoch), seeded.offset, deque(), seeded.offset)
        else:
            state = _Channel(new_epoch(), 0, deque(), 0)
        self._channels[channel] = state
        return state

    def _frame_at(self, channel: str, epoch: str, offset: int) -> bytes:
        """A duplicate's first frame, while the window still holds it; else empty bytes."""
        state = self._live(channel)
        if state is None or state.epoch != epoch or not state.window:
            return b""
        index = offset - state.window[0].offset
        if 0 <= index < len(state.window):
            return state.window[index].frame
        return b""
