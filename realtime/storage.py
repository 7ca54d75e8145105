"""What the realtime core needs from durable storage, defined here so `realtime` imports
nothing from `persistence` (which implements these)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

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


class RoomAccess(ABC):
    @abstractmethod
    async def can_access(self, room: str, user: UserInfo) -> bool:
        """False only for a private room the user is not a member of. May record a public
        room on first use (a join)."""

    async def can_read(self, room: str, user: UserInfo) -> bool:
        """As `can_access`, for reads (history, presence): records nothing, so a read of an
        unknown name leaves no trace and takes no name."""
        return await self.can_access(room, user)
