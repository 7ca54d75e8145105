"""The broker interface: how room and feed traffic reaches every node.

Implementations: `broker_memory.MemoryBroker` (one node, `memory://`) and
`broker_redis.RedisBroker` (many nodes, `redis://`, or a Redis Cluster with
`redis+cluster://`). All pass the same behaviour suite (`tests/test_broker_shared.py`).

Contract, for every implementation:

- Channels are named by the caller (`room:<name>` for chat rooms, `feed:<name>` for live
  feeds); the broker treats the name as opaque.
- `publish` is atomic: it takes the channel's next offset (exactly one more than the last,
  starting at 1 in a new epoch), appends the frame to the channel's recent-history window
  (trimmed to `history_window` entries), and delivers it to every subscribed node. Every node
  sees one channel's publications in offset order.
- The frame is built by the broker from the caller's fields, so that its offset and epoch are
  inside it: `{"type": <kind>, <name_key>: <channel name without prefix>, "epoch": ...,
  "offset": ..., <fields...>}`. Every node delivers those same bytes to its local members.
- Idempotency: with an `idempotency_key`, a second publish with the same key on the same
  channel publishes nothing and returns the first publication's position and `msg_id` with
  `duplicate=True`. Keys are remembered for at least `idempotency_ttl` seconds.
- `recent(channel, since)` answers the publications after `since` from the window, in order,
  only when it can prove them complete (same epoch, window reaching back far enough);
  otherwise `None`.
- Durable channels (`publish(..., durable=True)`: chat rooms, whose messages are stored) keep
  a storage mark beside the offset: every offset up to `stored` is confirmed stored (the
  reconciler confirms it, `confirm_stored`). The window never drops a publication above the
  mark, beyond the most recent `history_window`, unless more than `max_unconfirmed` are
  waiting: the window is then where an acknowledged message that storage lost is found
  again. A new epoch starts with the mark at its first offset minus one.
- Ephemeral events (typing, presence diffs) travel with `publish_event`: no offset, no history.
- `position` creates a channel's state (its epoch) on first use; `peek_position` never does.
- With `state_ttl` (seconds, 0: never), a channel's state (epoch, offset, window) is dropped
  once nobody published to it for that long, and the channel comes back with a new epoch
  (or its seed's), so positions clients hold are void (`recovered: false`). A durable
  channel's state never expires while it holds publications above its storage mark: the
  idle time counts from the publish, or the confirmation, that leaves nothing unconfirmed.
- While the backend is unreachable, `publish`, `publish_event`, `position` and `recent` raise
  `BrokerUnavailable`; nothing is half-published. A `publish` whose reply was lost is whole
  or not there at all, and says it may have been sent (`maybe_sent`).
- A broker never blocks on a slow consumer: `BrokerHandler` callbacks are plain functions
  that must return quickly.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

import orjson

from realtime.protocol import NAME_PATTERN
from realtime.types import Position

# The frame every backend builds, and every node delivers as is ------------------------------

_EPOCH = re.compile(NAME_PATTERN)  # as room names: plain tokens, safe unescaped in frames


def channel_name(channel: str) -> str:
    """The name a frame carries: `room:general` -> `general` (names may contain `:` too)."""
    _, sep, rest = channel.partition(":")
    return rest if sep else channel


def build_frame(head: bytes, epoch: str, offset: int, fields: bytes) -> bytes:
    """`head` is `{"type":<kind>,<name_key>:<name>`; broker-set members come before the
    caller's, whose object braces are dropped so that no JSON is parsed or re-encoded."""
    if not fields.startswith(b"{"):
        raise ValueError("fields must be the bytes of a JSON object")
    rest = fields[1:]
    position = b',"epoch":"' + epoch.encode() + b'","offset":' + str(offset).encode()
    if rest.strip() == b"}":
        return head + position + b"}"
    return head + position + b"," + rest


def check_epoch(epoch: str) -> str:
    """Epochs go into frames and pub/sub headers unescaped, so they must be plain tokens."""
    if not _EPOCH.fullmatch(epoch):
        raise ValueError(f"not a usable epoch: {epoch!r}")
    return epoch


def frame_head(kind: str, name_key: str, channel: str) -> bytes:
    return (
        b'{"type":'
        + orjson.dumps(kind)
        + b","
        + orjson.dumps(name_key)
        + b":"
        + orjson.dumps(channel_name(channel))
    )


class BrokerUnavailable(Exception):
    """The backend cannot be reached; the operation was not carried out.

    Except where `maybe_sent` says otherwise: a `publish` whose command reached the backend
    but whose reply never came back (the connection dropped, or the backend stalled past the
    timeout) may have run, and may yet run, so its message may reach members. Only a retry
    with the same idempotency key can tell, and it is safe either way."""

    def __init__(self, message: str, *, maybe_sent: bool = False) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


@dataclass(frozen=True, slots=True)
class Publication:
    """One offset-numbered frame of a channel."""

    channel: str
    epoch: str
    offset: int
    frame: bytes


@dataclass(frozen=True, slots=True)
class StorageMark:
    """How far a durable channel's publications are confirmed stored."""

    epoch: str
    top: int  # the last offset published
    stored: int  # every offset up to this one is confirmed stored, or accounted for


@dataclass(frozen=True, slots=True)
class PublishResult:
    epoch: str
    offset: int
    msg_id: str
    frame: bytes
    duplicate: bool = False


class BrokerHandler(Protocol):
    """What a broker calls on this node. Must not block: called from the broker's listener."""

    def on_publication(self, publication: Publication) -> None: ...

    def on_event(self, channel: str, frame: bytes, exclude_user: str | None) -> None: ...

    def on_presence(self, channel: str, frame: bytes) -> None:
        """A presence event (joins and leaves): a kind of its own, so that members that asked
        for no presence events are spared without anyone reading the frame."""

    def on_resubscribed(self, channels: list[str]) -> None:
        """The broker lost its connection and came back: anything may have been missed on
        these channels, so their local members must recover."""


# Seeds a channel's position the first time the broker sees it (the memory broker uses it to
# continue the durable store's epoch after a restart). None: start a new epoch at offset 0.
PositionSeed = Callable[[str], Awaitable[Position | None]]


class Broker(ABC):
    """Room and feed traffic between nodes. See the module docstring for the contract."""

    history_window: int
    idempotency_ttl: float
    max_unconfirmed: int
    state_ttl: float = 0

    @abstractmethod
    async def start(self, handler: BrokerHandler) -> None:
        """Connect and start listening; publications go to `handler`."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def subscribe(self, channel: str) -> None:
        """Receive this channel's publications and events. Idempotent; the hub ref-counts."""

    @abstractmethod
    async def unsubscribe(self, channel: str) -> None: ...

    @abstractmethod
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
        """Publish one frame. `fields` is a JSON object's bytes (`{"msg_id": ..., ...}`) whose
        members follow the broker-set ones in the frame. `durable`: the channel's
        publications are stored, and the window keeps them until `confirm_stored`."""

    @abstractmethod
    async def publish_event(
        self,
        channel: str,
        frame: bytes,
        *,
        exclude_user: str | None = None,
        presence: bool = False,
    ) -> None:
        """An ephemeral frame to the channel's members on every node, in no particular order
        relative to publications; `presence` frames reach `on_presence`, the others
        `on_event`."""

    @abstractmethod
    async def position(self, channel: str) -> Position:
        """The channel's current epoch and last offset (0 when nothing was published)."""

    @abstractmethod
    async def peek_position(self, channel: str) -> Position | None:
        """The channel's position if the broker has it, else None; never creates it.

        For reads (history, presence) of any name a client sends: unlike `position`, which
        starts a channel's epoch, this leaves nothing behind."""

    @abstractmethod
    async def recent(self, channel: str, since: Position) -> list[Publication] | None:
        """Publications after `since`, complete and in order, or None when that can't be proven."""

    @abstractmethod
    async def last_frame(self, channel: str) -> bytes | None:
        """The newest publication's frame, if the window still holds it (a feed's snapshot)."""

    # The storage ledger (read by the reconciler) -------------------------------------------

    @abstractmethod
    async def unconfirmed(self, limit: int = 10_000) -> list[str]:
        """Durable channels that may hold publications not yet confirmed stored (at most
        `limit`). A channel may be named that turns out to be confirmed; none is left out
        that has an unconfirmed publication older than a few seconds."""

    @abstractmethod
    async def storage_mark(self, channel: str) -> StorageMark | None:
        """The channel's storage mark; None for a channel never published to. Creates nothing."""

    @abstractmethod
    async def window(self, channel: str, epoch: str, first: int, last: int) -> list[Publication]:
        """The publications from `first` to `last` that the window still holds, in order (none
        when the epoch is not the current one)."""

    @abstractmethod
    async def confirm_stored(self, channel: str, epoch: str, offset: int) -> StorageMark | None:
        """Every offset up to `offset` of `epoch` is stored: raise the mark (never lower it,
        never past the top, not at all in another epoch) and let the window drop them."""

    async def claim(self, channel: str, seconds: float) -> bool:
        """Take the channel's reconciliation for `seconds`, so nodes do not verify one
        channel at the same time; False when another node holds it. One process: always."""
        return True

    @property
    @abstractmethod
    def healthy(self) -> bool:
        """False while the backend is unreachable (for `/readyz`)."""
