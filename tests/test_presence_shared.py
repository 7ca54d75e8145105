"""One behaviour suite for every presence backend (memory and Redis), through a factory.

Time: the memory backend runs on a fake clock that the test moves; the Redis backend reads
Redis `TIME`, so its tests really wait (a short timeout keeps that well under a second per
step). Either way a test says `await backend.advance(seconds)`.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from realtime.presence import Member, Presence, PresenceUnavailable
from realtime.presence_memory import MemoryPresence
from realtime.presence_redis import RedisPresence
from realtime.types import UserInfo
from tests import backends
from tests.services import free_port

ANN = UserInfo("1", "ann")
BOB = UserInfo("2", "bob")
CAT = UserInfo("3", "cat")

TIMEOUT = 2.0
# Steps are chosen with room either side of TIMEOUT: 1.2 s is young, 2.4 s is stale. On the
# Redis backends they are real seconds. Waiting longer only makes an entry staler, so the
# margin that matters is the young side's: it must hold a few round trips to a cluster's
# shards and the event loop's lateness on a busy machine (0.15 s was too little, and 0.3 s
# too: a sweep found an entry refreshed one step before already stale, with the suite's
# other worker running beside it).
STEP = 1.2


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    url: str
    clock: FakeClock = field(default_factory=FakeClock)
    made: list[Presence] = field(default_factory=list)

    async def presence(self, timeout: float = TIMEOUT) -> Presence:
        made: Presence
        if self.url != "memory://":  # a single Redis or a Redis Cluster
            made = RedisPresence(self.url, timeout=timeout)
        else:
            made = MemoryPresence(timeout=timeout, clock=self.clock)
        await made.start()
        self.made.append(made)
        return made

    async def nodes(self, count: int) -> list[Presence]:
        """Presence as `count` nodes see it; in memory, one store shared by them."""
        if self.url != "memory://":  # a single Redis or a Redis Cluster
            return [await self.presence() for _ in range(count)]
        shared = await self.presence()
        return [shared] * count

    async def advance(self, seconds: float) -> None:
        if self.url != "memory://":  # a single Redis or a Redis Cluster
            await asyncio.sleep(seconds)
        else:
            self.clock.now += seconds


@pytest.fixture(params=backends.KINDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    return backends.backend_url(request)


@pytest.fixture
async def backend(backend_url: str) -> AsyncIterator[Backend]:
    made = Backend(backend_url)
    yield made
    for presence in made.made:
        await presence.close()


def room() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


async def test_first_connection_joins_and_last_leaves(backend: Backend) -> None:
    presence = await backend.presence()
    r = room()
    assert await presence.add(r, "a1", ANN, "n1") is True
    assert await presence.add(r, "a2", ANN, "n2") is False
    assert await presence.add(r, "b1", BOB, "n1") is True
    assert await presence.add(r, "a1", ANN, "n1") is False  # the same connection again
    assert await presence.members(r) == [Member(ANN, 2), Member(BOB, 1)]

    assert await presence.remove(r, "a1") is None
    assert await presence.members(r) == [Member(ANN, 1), Member(BOB, 1)]
    assert await presence.remove(r, "a2") == ANN
    assert await presence.remove(r, "a2") is None
    assert await presence.remove(r, "nobody") is None
    assert await presence.remove(room(), "a1") is None
    assert await presence.members(r) == [Member(BOB, 1)]
    assert await presence.remove(r, "b1") == BOB
    assert await presence.members(r) == []

    assert await presence.add(r, "a3", ANN, "n1") is True  # back again: a new join


async def test_members_are_per_room_and_ordered_by_user_id(backend: Backend) -> None:
    presence = await backend.presence()
    r, other = room(), room()
    await presence.add(r, "c1", CAT, "n1")
    await presence.add(r, "a1", ANN, "n1")
    await presence.add(other, "b1", BOB, "n1")
    await presence.add(r, "c2", CAT, "n2")
    assert await presence.members(r) == [Member(ANN, 1), Member(CAT, 2)]
    assert await presence.members(other) == [Member(BOB, 1)]
    assert await presence.members(room()) == []
    assert (await presence.members(r))[1].as_dict() == {
        "user": {"id": "3", "name": "cat"},
        "connections": 2,
    }


async def test_a_member_is_named_by_their_latest_connection(backend: Backend) -> None:
    presence = await backend.presence()
    r = room()
    renamed = UserInfo(ANN.id, "ann (renamed)")
    await presence.add(r, "a1", ANN, "n1")
    await presence.add(r, "a2", renamed, "n1")
    assert await presence.members(r) == [Member(renamed, 2)]
    # A connection id taken over by another user moves the count, and the name with it.
    await presence.add(r, "a2", BOB, "n1")
    assert await presence.members(r) == [Member(renamed, 1), Member(BOB, 1)]
    await presence.remove(r, "a1")
    await presence.add(r, "a3", ANN, "n1")
    assert await presence.members(r) == [Member(ANN, 1), Member(BOB, 1)]


async def test_each_transition_is_seen_once_across_nodes(backend: Backend) -> None:
    nodes = await backend.nodes(2)
    r = room()
    joined = await asyncio.gather(
        *(nodes[i % 2].add(r, f"a{i}", ANN, f"n{i % 2}") for i in range(20))
    )
    assert joined.count(True) == 1
    assert await nodes[0].members(r) == [Member(ANN, 20)]
    left = await asyncio.gather(*(nodes[i % 2].remove(r, f"a{i}") for i in range(20)))
    assert [user for user in left if user is not None] == [ANN]
    assert await nodes[1].members(r) == []


async def test_expire_reports_each_leave_once_with_concurrent_callers(backend: Backend) -> None:
    nodes = await backend.nodes(2)
    r, s = room(), room()
    await nodes[0].add(r, "a1", ANN, "n1")
    await nodes[1].add(r, "a2", ANN, "n2")
    await nodes[0].add(r, "b1", BOB, "n1")
    await nodes[1].add(r, "c1", CAT, "n2")
    await nodes[0].add(s, "b2", BOB, "n1")

    await backend.advance(STEP)
    await nodes[1].refresh([(r, "a2"), (r, "c1")])  # node 2 is alive; node 1 has crashed
    await backend.advance(STEP)
    results = await asyncio.gather(nodes[0].expire(), nodes[1].expire())
    reported = [pair for result in results for pair in result]
    assert sorted(reported, key=repr) == sorted([(r, BOB), (s, BOB)], key=repr)
    assert await nodes[0].members(r) == [Member(ANN, 1), Member(CAT, 1)]
    assert await nodes[0].members(s) == []
    assert await nodes[0].expire() == []

    await backend.advance(2 * STEP)
    results = await asyncio.gather(nodes[0].expire(), nodes[1].expire())
    reported = [pair for result in results for pair in result]
    assert sorted(reported, key=repr) == sorted([(r, ANN), (r, CAT)], key=repr)
    assert await nodes[1].members(r) == []


async def test_refresh_keeps_entries_alive(backend: Backend) -> None:
    presence = await backend.presence()
    r = room()
    await presence.add(r, "a1", ANN, "n1")
    for _ in range(3):  # 3 x STEP is well past TIMEOUT
        await backend.advance(STEP)
        await presence.refresh([(r, "a1")])
        assert await presence.expire() == []
    assert await presence.members(r) == [Member(ANN, 1)]


async def test_refresh_does_not_bring_back_a_removed_entry(backend: Backend) -> None:
    presence = await backend.presence()
    r = room()
    await presence.add(r, "a1", ANN, "n1")
    await presence.remove(r, "a1")
    other = room()
    await presence.add(r, "b1", BOB, "n1")
    # What it did not find is reported, so the owner can add back what is still connected.
    missing = await presence.refresh([(r, "a1"), (other, "x"), (r, "b1")])
    assert sorted(missing) == sorted([(r, "a1"), (other, "x")])
    await presence.remove(r, "b1")
    assert await presence.members(r) == []
    assert await presence.add(r, "a1", ANN, "n1") is True
    assert await presence.expire() == []


async def test_a_room_emptied_by_expiry_can_be_joined_again(backend: Backend) -> None:
    presence = await backend.presence()
    r = room()
    await presence.add(r, "a1", ANN, "n1")
    await backend.advance(2 * STEP)
    assert await presence.expire() == [(r, ANN)]
    assert await presence.add(r, "a2", ANN, "n1") is True
    await backend.advance(2 * STEP)
    assert await presence.expire() == [(r, ANN)]  # the room is still found


@pytest.mark.redis
async def test_redis_presence_raises_unavailable_when_nothing_listens() -> None:
    presence = RedisPresence(f"redis://127.0.0.1:{free_port()}/0", timeout=TIMEOUT)
    try:
        await presence.start()  # an outage at startup is not fatal
        with pytest.raises(PresenceUnavailable):
            await presence.add(room(), "a1", ANN, "n1")
        with pytest.raises(PresenceUnavailable):
            await presence.remove(room(), "a1")
        with pytest.raises(PresenceUnavailable):
            await presence.members(room())
        with pytest.raises(PresenceUnavailable):
            await presence.refresh([(room(), "a1")])
        with pytest.raises(PresenceUnavailable):
            await presence.expire()
    finally:
        await presence.close()


@pytest.mark.redis
async def test_redis_members_named_from_connections_kept_by_an_older_node(redis_url: str) -> None:
    """Rooms whose entries an older version added have no names hash: a rolling upgrade
    must not show its users without names."""
    import redis.asyncio as aioredis

    presence = RedisPresence(redis_url, timeout=TIMEOUT)
    client = aioredis.Redis.from_url(redis_url)
    try:
        r = room()
        await presence.add(r, "a1", ANN, "n1")
        await presence.add(r, "c1", CAT, "n1")
        await client.delete(f"collab:presence:{{{r}}}:names")
        assert await presence.members(r) == [Member(ANN, 1), Member(CAT, 1)]
    finally:
        await client.aclose()
        await presence.close()
