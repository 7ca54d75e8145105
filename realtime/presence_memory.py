"""Presence for one node (`memory://`): the contract of `realtime.presence`, in-process.

Nothing here awaits, so every method is atomic by construction. The clock is injectable so
tests can expire entries without waiting.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from realtime.presence import Member, Presence
from realtime.types import UserInfo

__all__ = ["MemoryPresence"]


@dataclass(slots=True)
class _Entry:
    user: UserInfo
    node_id: str
    seen: float


@dataclass(slots=True)
class _Room:
    entries: dict[str, _Entry]
    counts: dict[str, int]  # user id -> connections in this room
    # user id -> the user as their latest connection here named them. Kept alongside the
    # entries so that `members` (part of every join's reply) costs one step per user, not
    # one per connection: a join storm into one room would otherwise be quadratic.
    users: dict[str, UserInfo]


class MemoryPresence(Presence):
    def __init__(self, timeout: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout = timeout
        self._clock = clock
        self._rooms: dict[str, _Room] = {}

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        self._rooms.clear()

    async def add(self, room: str, conn_id: str, user: UserInfo, node_id: str) -> bool:
        state = self._rooms.setdefault(room, _Room({}, {}, {}))
        entry = state.entries.get(conn_id)
        if entry is not None and entry.user.id == user.id:
            entry.user, entry.node_id, entry.seen = user, node_id, self._clock()
            state.users[user.id] = user
            return False
        if entry is not None:
            # A connection id reused for another user: the old user's connection is gone.
            self._drop(state, conn_id)
        state.entries[conn_id] = _Entry(user, node_id, self._clock())
        count = state.counts.get(user.id, 0) + 1
        state.counts[user.id] = count
        state.users[user.id] = user
        return count == 1

    async def remove(self, room: str, conn_id: str) -> UserInfo | None:
        state = self._rooms.get(room)
        if state is None or conn_id not in state.entries:
            return None
        left = self._drop(state, conn_id)
        if not state.entries:
            del self._rooms[room]
        return left

    async def members(self, room: str) -> list[Member]:
        state = self._rooms.get(room)
        if state is None:
            return []
        return [
            Member(user=state.users[user_id], connections=count)
            for user_id, count in sorted(state.counts.items())
        ]

    async def refresh(self, entries: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        now = self._clock()
        missing: list[tuple[str, str]] = []
        for room, conn_id in entries:
            state = self._rooms.get(room)
            entry = state.entries.get(conn_id) if state is not None else None
            if entry is not None:
                entry.seen = now
            else:
                missing.append((room, conn_id))
        return missing

    async def expire(self) -> list[tuple[str, UserInfo]]:
        cutoff = self._clock() - self.timeout
        left: list[tuple[str, UserInfo]] = []
        for room in list(self._rooms):
            state = self._rooms[room]
            stale = [conn_id for conn_id, entry in state.entries.items() if entry.seen < cutoff]
            for conn_id in stale:
                user = self._drop(state, conn_id)
                if user is not None:
                    left.append((room, user))
            if not state.entries:
                del self._rooms[room]
        return left

    @staticmethod
    def _drop(state: _Room, conn_id: str) -> UserInfo | None:
        """Forgets one connection; the user when it was their last in the room."""
        entry = state.entries.pop(conn_id)
        count = state.counts[entry.user.id] - 1
        if count > 0:
            state.counts[entry.user.id] = count
            return None
        del state.counts[entry.user.id]
        del state.users[entry.user.id]
        return entry.user
