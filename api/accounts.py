"""What a WebSocket connect needs of an account, remembered for a few seconds.

Every connect checks that the account still stands behind its token (it exists, with the token
version the token carries). That was a database read per connect: a pooled session, a query
through the ORM, a rollback on return, each a hop to the database's thread and back, and
under a burst of connects most of the connect's cost.

Here the answer is kept for `ttl` seconds, keyed by the account's id and checked against the
token's version: a token whose version is not the remembered one is looked up again (the
account may have moved on since, and a newer token must not be refused on an old memory).
What must end at once ends at once: deleting an account and changing its password or role
call `Node.disconnect_user`, which reaches every node through the broker's control channel,
and each node forgets the account there (`forget`), before its sockets are closed. A lookup
that was already on its way when that happened does not store its answer (`generation`).

What may lag by up to `ttl`: a new display name, in connections opened meanwhile (a new
display name ends no token and closes no socket). With `ttl` 0 nothing is remembered.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Account:
    """The fields of a user row a connection carries."""

    id: int
    version: int
    name: str
    role: str


class AccountCache:
    def __init__(
        self,
        ttl: float,
        max_entries: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must not be negative, not {ttl!r}")
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[int, tuple[float, Account]] = {}
        # Moves on with every `forget`: a lookup that began before it does not store.
        self.generation = 0
        self.hits = 0
        self.misses = 0

    def remember(self, account: Account, generation: int | None = None) -> None:
        if self.ttl <= 0 or (generation is not None and generation != self.generation):
            return
        # Entries are in the order they expire (one ttl for all, a re-stored one moves to the
        # end): the expired ones are at the front, and go here, or every guest of a crowd
        # would stay remembered, useless, until `max_entries` pushed it out.
        now = self._clock()
        while self._entries:
            oldest = next(iter(self._entries))
            if self._entries[oldest][0] > now:
                break
            del self._entries[oldest]
        if len(self._entries) >= self.max_entries:
            # Oldest stored first (dicts keep insertion order); enough for a bound.
            self._entries.pop(next(iter(self._entries)))
        self._entries.pop(account.id, None)
        self._entries[account.id] = (now + self.ttl, account)

    def forget(self, user_id: int) -> None:
        self.generation += 1
        self._entries.pop(user_id, None)

    async def holder(
        self, user_id: int, version: int, load: Callable[[], Awaitable[Account | None]]
    ) -> Account | None:
        """The account behind a token of `user_id` at `version`, or None if none stands behind
        it; `load` reads it from the database when it is not remembered."""
        entry = self._entries.get(user_id)
        if entry is not None:
            expires, remembered = entry
            if expires > self._clock() and remembered.version == version:
                self.hits += 1
                return remembered
        self.misses += 1
        generation = self.generation
        account = await load()
        if account is not None:
            self.remember(account, generation)
        if account is None or account.version != version:
            return None
        return account
