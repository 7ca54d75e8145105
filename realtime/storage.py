"""What the realtime core needs from durable storage, defined here so `realtime` imports
nothing from `persistence` (which implements these)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

from realtime.stats import Stat
from realtime.types import UserInfo


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A chat message as accepted by the hub: everything needed to store it and to send it."""

    msg_id: str
    room: str
    epoch: str
    offset: int
    user: UserInfo
    body: dict[str, Any]
    client_msg_id: str | None
    ts: str  # ISO 8601 UTC with milliseconds and a Z, as on the wire

    @classmethod
    def from_event(cls, event: dict[str, Any]) -> StoredMessage:
        """The message of a `message` event (a frame from the broker's window); raises
        KeyError, TypeError or ValueError when it is not one."""
        user = event["user"]
        body = event["body"]
        if not isinstance(body, dict) or not isinstance(user, dict):
            raise TypeError("a message's body and user are JSON objects")
        client_msg_id = event.get("client_msg_id")
        return cls(
            msg_id=str(event["msg_id"]),
            room=str(event["room"]),
            epoch=str(event["epoch"]),
            offset=int(event["offset"]),
            user=UserInfo(id=str(user["id"]), name=str(user["name"])),
            body=body,
            client_msg_id=None if client_msg_id is None else str(client_msg_id),
            ts=str(event["ts"]),
        )

    def event(self) -> dict[str, Any]:
        """The `message` event of PROTOCOL.md."""
        return {
            "type": "message",
            "room": self.room,
            "epoch": self.epoch,
            "offset": self.offset,
            "msg_id": self.msg_id,
            "client_msg_id": self.client_msg_id,
            "user": self.user.as_dict(),
            "body": self.body,
            "ts": self.ts,
        }


class SinkUnavailable(Exception):
    """The message could not be handed to durable storage; it must not be acknowledged."""


class MessageRefused(Exception):
    """The database refused this message for good (a bad row, not an outage); it was set
    aside with the database's reason, and the rest of its batch was stored."""


class MessageSink(ABC):
    """Takes accepted messages to durable storage.

    `store` returns once the message is safe: committed (embedded mode) or in the Celery
    broker's queue (production). Implementations batch internally, so concurrent `store`
    calls share one write.
    """

    # False while the last attempt to hand messages on failed (for `/readyz`).
    healthy: bool = True

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Flush what is pending, then stop."""

    @abstractmethod
    async def store(self, message: StoredMessage) -> None: ...

    def stats(self) -> list[Stat]:
        """What this sink counts (`realtime.stats`); none by default."""
        return []


class HistoryReader(ABC):
    @abstractmethod
    async def page(
        self,
        room: str,
        epoch: str | None,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> tuple[list[StoredMessage], bool]:
        """Messages of one epoch of a room (the newest stored epoch when None), oldest first,
        and whether more exist beyond the page."""

    @abstractmethod
    async def last_position(self, room: str) -> tuple[str, int] | None: ...


@dataclass(frozen=True, slots=True)
class RestoreOutcome:
    written: int  # rows new to the store
    set_aside: int  # rows the database refused, kept apart with its reason


class StorageLedger(ABC):
    """What the reconciler asks of durable storage: which offsets it has, and to take the
    ones it lacks through the same idempotent path as every other write."""

    @abstractmethod
    async def count_accounted(self, room: str, epoch: str, first: int, last: int) -> int:
        """How many offsets from `first` to `last` are stored or set aside."""

    @abstractmethod
    async def accounted(self, room: str, epoch: str, first: int, last: int) -> set[int]:
        """The offsets from `first` to `last` that are stored or set aside."""

    @abstractmethod
    async def restore(self, messages: list[StoredMessage]) -> RestoreOutcome:
        """Store messages, skipping ids already stored; raises when storage is unavailable."""


class RoomAccess(ABC):
    @abstractmethod
    async def can_access(self, room: str, user: UserInfo) -> bool:
        """False only for a private room the user is not a member of. May record a public
        room on first use (a join)."""

    async def can_read(self, room: str, user: UserInfo) -> bool:
        """As `can_access`, for reads (history, presence): records nothing, so a read of an
        unknown name leaves no trace and takes no name."""
        return await self.can_access(room, user)
