"""The presence interface: who is in a room, across every node.

Implementations: `presence_memory.MemoryPresence` and `presence_redis.RedisPresence` (a
single Redis or a Redis Cluster); all pass `tests/test_presence_shared.py`.

Contract:

- An entry is one connection (`conn_id`, unique across nodes) of one user in one room, owned
  by the node that holds the socket.
- `add` and `remove` are atomic per room and report whether the *user* joined (their first
  connection in the room) or left (their last). Exactly one caller, on whichever node, sees
  `True` for each transition, so each join and leave is announced once.
- Entries carry a last-seen time. The owning node calls `refresh` for its live connections
  (more often than `timeout`); `expire` removes entries not refreshed within `timeout`
  seconds (a crashed node's connections) and returns the users that thereby left, each
  reported once across all nodes calling `expire` concurrently.
- `refresh` never brings an entry back, but it reports the ones it no longer found (the
  backend lost them, or they expired while the owner could not refresh): only the owner
  knows whether the connection is still there, and adds it again if so.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

from realtime.types import UserInfo


@dataclass(frozen=True, slots=True)
class Member:
    user: UserInfo
    connections: int

    def as_dict(self) -> dict[str, object]:
        return {"user": self.user.as_dict(), "connections": self.connections}


class PresenceUnavailable(Exception):
    """The backend cannot be reached."""


class Presence(ABC):
    timeout: float

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def add(self, room: str, conn_id: str, user: UserInfo, node_id: str) -> bool:
        """Record a connection in a room; True when it is the user's first there."""

    @abstractmethod
    async def remove(self, room: str, conn_id: str) -> UserInfo | None:
        """Forget a connection; the user when that was their last connection in the room."""

    @abstractmethod
    async def members(self, room: str) -> list[Member]:
        """Users present, each with their number of connections, ordered by user id."""

    @abstractmethod
    async def refresh(self, entries: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        """Mark these (room, conn_id) entries as seen now; the ones that were not found."""

    @abstractmethod
    async def expire(self) -> list[tuple[str, UserInfo]]:
        """Drop entries not refreshed within `timeout`; the (room, user) pairs that left."""
