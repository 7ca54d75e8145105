"""WebSocket connection tickets: the memory and Redis stores keep the same promises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from api.tickets import MemoryTicketStore, RedisTicketStore, TicketStore
from tests.services import REDIS_URL, require

StoreFactory = Callable[[float], TicketStore]


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def stores(request: pytest.FixtureRequest) -> AsyncIterator[StoreFactory]:
    """A factory: each store it makes is one node's view of the same tickets."""
    made: list[TicketStore] = []
    if request.param == "memory":
        shared = MemoryTicketStore(30)

        def memory(ttl: float) -> TicketStore:
            shared.ttl = ttl  # one process: every "node" is the same store
            return shared

        yield memory
        return
    # Tickets are random keys with an expiry: nothing to flush before or after.
    require(REDIS_URL, 6379, "Redis")

    def redis(ttl: float) -> TicketStore:
        store = RedisTicketStore(REDIS_URL, ttl)
        made.append(store)
        return store

    try:
        yield redis
    finally:
        for store in made:
            await store.close()


async def test_a_ticket_names_its_account_and_works_once(stores: StoreFactory) -> None:
    first, second = stores(30), stores(30)
    ticket = await first.issue(42, 7)
    assert len(ticket) >= 40
    # Two nodes try the same ticket at once: exactly one gets the account.
    results = await asyncio.gather(first.redeem(ticket), second.redeem(ticket))
    assert sorted(results, key=str) == [(42, 7), None]
    assert await first.redeem(ticket) is None
    assert await second.redeem(await first.issue(43, 1)) == (43, 1)


async def test_expired_unknown_and_malformed_tickets_are_refused(stores: StoreFactory) -> None:
    store = stores(1.0)
    ticket = await store.issue(1, 1)
    await asyncio.sleep(1.2)
    assert await store.redeem(ticket) is None
    for bad in ("", "short", "x" * 65, "a" * 43, "../../etc/passwd" + "a" * 30, "é" * 43):
        assert await store.redeem(bad) is None
