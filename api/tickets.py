"""One-use WebSocket connection tickets (`POST /auth/ws-ticket`).

A browser can only carry a credential to a WebSocket in the URL, and URLs end up in access
logs, proxies and browser history. A ticket put there instead is short-lived (seconds) and
works once, so a logged one is worth nothing. One use must hold across nodes: with a Redis
broker the ticket lives in Redis (SET NX on issue, GETDEL on use); the embedded default is
one process, which keeps tickets in memory.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from realtime.backends import is_shared

_TICKET = re.compile(r"^[A-Za-z0-9_-]{20,64}$")
MAX_MEMORY_TICKETS = 100_000


def _well_formed(ticket: str) -> bool:
    return bool(_TICKET.match(ticket))


@dataclass(frozen=True, slots=True)
class TicketHolder:
    """Whom a ticket was issued to: the account, its token version, and when the token that
    asked for the ticket expires (the socket opened with the ticket closes then too)."""

    user_id: int
    version: int
    expires_at: float | None = None


def _encode(user_id: int, version: int, expires_at: float | None) -> str:
    return f"{user_id}:{version}:{'' if expires_at is None else int(expires_at)}"


def _decode(value: str) -> TicketHolder | None:
    user_id, _, rest = value.partition(":")
    version, _, expires = rest.partition(":")
    try:
        return TicketHolder(int(user_id), int(version), float(expires) if expires else None)
    except ValueError:
        return None


class TicketStore(Protocol):
    """Issues tickets for an account (its id and token version) and redeems each once."""

    ttl: float

    async def issue(self, user_id: int, version: int, expires_at: float | None = None) -> str: ...

    async def redeem(self, ticket: str) -> TicketHolder | None:
        """The account the ticket was issued for; None when unknown, used or expired."""
        ...

    async def close(self) -> None: ...


class MemoryTicketStore:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        # ticket -> (account, expiry); every ticket lives as long, so insertion order is
        # expiry order and the expired ones are always at the front.
        self._tickets: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def issue(self, user_id: int, version: int, expires_at: float | None = None) -> str:
        now = time.monotonic()
        while self._tickets:
            _, (_, expires) = next(iter(self._tickets.items()))
            if expires > now and len(self._tickets) < MAX_MEMORY_TICKETS:
                break
            self._tickets.popitem(last=False)
        ticket = secrets.token_urlsafe(32)
        self._tickets[ticket] = (_encode(user_id, version, expires_at), now + self.ttl)
        return ticket

    async def redeem(self, ticket: str) -> TicketHolder | None:
        if not _well_formed(ticket):
            return None
        entry = self._tickets.pop(ticket, None)
        if entry is None or entry[1] <= time.monotonic():
            return None
        return _decode(entry[0])

    async def close(self) -> None:
        self._tickets.clear()


class RedisTicketStore:
    PREFIX = "collab:ws-ticket:"

    def __init__(self, url: str, ttl: float) -> None:
        # redis is an optional dependency; a Redis Cluster URL gives a cluster client
        from realtime.redis_client import any_redis_client

        self.ttl = ttl
        self._redis = any_redis_client(url, timeout=5)

    async def issue(self, user_id: int, version: int, expires_at: float | None = None) -> str:
        ticket = secrets.token_urlsafe(32)
        # NX: a ticket is never overwritten, however unlikely a repeat of 256 random bits.
        await self._redis.set(
            self.PREFIX + ticket,
            _encode(user_id, version, expires_at),
            px=int(self.ttl * 1000),
            nx=True,
        )
        return ticket

    async def redeem(self, ticket: str) -> TicketHolder | None:
        if not _well_formed(ticket):
            return None
        # GETDEL is one step: of two nodes redeeming the same ticket, only one gets it.
        value = await self._redis.getdel(self.PREFIX + ticket)
        if value is None:
            return None
        return _decode(value.decode() if isinstance(value, bytes) else value)

    async def close(self) -> None:
        await self._redis.aclose()


def ticket_store(broker_url: str, ttl: float) -> TicketStore:
    if is_shared(broker_url):
        return RedisTicketStore(broker_url, ttl)
    return MemoryTicketStore(ttl)
