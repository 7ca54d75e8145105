"""WebSocket connection tickets: the memory and Redis stores keep the same promises."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import pytest

from api.tickets import MemoryTicketStore, RedisTicketStore, TicketStore
from tests.processes import RedisServer, ServerProcess, require_redis_server, server_env
from tests.security.common import ws_outcome
from tests.services import REDIS_URL, require
from tests.wsclient import guest_token

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
    winners = [r for r in results if r is not None]
    assert len(winners) == 1 and results.count(None) == 1
    assert (winners[0].user_id, winners[0].version) == (42, 7)
    assert await first.redeem(ticket) is None
    holder = await second.redeem(await first.issue(43, 1, 1_900_000_000))
    assert holder is not None
    assert (holder.user_id, holder.version, holder.expires_at) == (43, 1, 1_900_000_000)


async def test_expired_unknown_and_malformed_tickets_are_refused(stores: StoreFactory) -> None:
    store = stores(1.0)
    ticket = await store.issue(1, 1)
    await asyncio.sleep(1.2)
    assert await store.redeem(ticket) is None
    for bad in ("", "short", "x" * 65, "a" * 43, "../../etc/passwd" + "a" * 30, "é" * 43):
        assert await store.redeem(bad) is None


@pytest.mark.slow
async def test_with_redis_down_tickets_answer_503_and_connects_1011(tmp_path: Path) -> None:
    require_redis_server()
    broker = RedisServer(tmp_path)
    broker.start()
    try:
        extra = {"COLLAB_BROKER_URL": broker.url}
        server = ServerProcess(server_env(tmp_path, extra), tmp_path / "server.log").start()
        try:
            token = guest_token(server.url)
            headers = {"Authorization": f"Bearer {token}"}
            ticket = httpx.post(f"{server.url}/auth/ws-ticket", headers=headers).json()["ticket"]
            broker.kill()
            # Not the client's fault: no 500 and no 4401 ("get a new token"), but come back.
            refused = httpx.post(f"{server.url}/auth/ws-ticket", headers=headers, timeout=30)
            assert refused.status_code == 503 and "retry-after" in refused.headers
            assert await ws_outcome(f"{server.ws_url}/ws/chat?ticket={ticket}") == 1011
        finally:
            server.stop()
    finally:
        broker.kill()
