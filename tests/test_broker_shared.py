"""One behaviour suite for every broker (memory and Redis), in the spirit of centrifuge's
`map_broker_shared_test.go`: the same tests through a factory, then what only Redis can show
(several nodes, a lost connection, a restart).

Absence is proven without sleeping: after the publication that must not arrive, a marker is
published on a channel that is subscribed; publications of one node's subscriptions arrive in
the order Redis ran the scripts, so once the marker is in, anything earlier would be too.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pytest

from realtime.broker import (
    Broker,
    BrokerUnavailable,
    PositionSeed,
    Publication,
    PublishResult,
)
from realtime.broker_memory import MemoryBroker
from realtime.broker_redis import RedisBroker
from realtime.types import Position, new_msg_id
from tests import backends
from tests.processes import RedisServer, require_redis_server
from tests.services import free_port


class Recorder:
    """A BrokerHandler that remembers what it was given."""

    def __init__(self) -> None:
        self.publications: dict[str, list[Publication]] = {}
        self.events: list[tuple[str, bytes, str | None]] = []
        self.presence: list[tuple[str, bytes]] = []
        self.resubscribed: list[list[str]] = []

    def on_publication(self, publication: Publication) -> None:
        self.publications.setdefault(publication.channel, []).append(publication)

    def on_event(self, channel: str, frame: bytes, exclude_user: str | None) -> None:
        self.events.append((channel, frame, exclude_user))

    def on_presence(self, channel: str, frame: bytes) -> None:
        self.presence.append((channel, frame))

    def on_resubscribed(self, channels: list[str]) -> None:
        self.resubscribed.append(channels)

    def offsets(self, channel: str) -> list[int]:
        return [p.offset for p in self.publications.get(channel, [])]

    async def until(self, condition: Callable[[Recorder], bool]) -> None:
        await eventually(lambda: condition(self))


async def eventually(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout}s")
        await asyncio.sleep(0.005)


def channel(prefix: str = "room") -> str:
    return f"{prefix}:t{uuid.uuid4().hex[:10]}"


@dataclass
class Node:
    broker: Broker
    seen: Recorder


@dataclass
class Backend:
    """Makes brokers of one kind and closes them after the test."""

    url: str
    made: list[Broker] = field(default_factory=list)

    @property
    def is_redis(self) -> bool:
        return self.url != "memory://"  # a single Redis or a Redis Cluster

    def broker(
        self,
        *,
        history_window: int = 1000,
        idempotency_ttl: float = 86400,
        seed: PositionSeed | None = None,
        max_unconfirmed: int = 100_000,
        state_ttl: float = 0,
    ) -> Broker:
        made: Broker
        if self.is_redis:
            made = RedisBroker(
                self.url,
                history_window=history_window,
                idempotency_ttl=idempotency_ttl,
                seed=seed,
                node_id=f"test-{uuid.uuid4().hex[:8]}",
                max_unconfirmed=max_unconfirmed,
                state_ttl=state_ttl,
            )
        else:
            made = MemoryBroker(
                history_window, idempotency_ttl, seed, max_unconfirmed, state_ttl=state_ttl
            )
        self.made.append(made)
        return made

    async def node(
        self,
        *,
        history_window: int = 1000,
        idempotency_ttl: float = 86400,
        seed: PositionSeed | None = None,
        max_unconfirmed: int = 100_000,
        state_ttl: float = 0,
    ) -> Node:
        broker = self.broker(
            history_window=history_window,
            idempotency_ttl=idempotency_ttl,
            seed=seed,
            max_unconfirmed=max_unconfirmed,
            state_ttl=state_ttl,
        )
        seen = Recorder()
        await broker.start(seen)
        return Node(broker, seen)

    async def nodes(self, count: int, *, seed: PositionSeed | None = None) -> list[Node]:
        """`count` nodes sharing one backend; the memory broker is a cluster of one."""
        return [await self.node(seed=seed) for _ in range(count if self.is_redis else 1)]


@pytest.fixture(params=backends.KINDS)
def backend_url(request: pytest.FixtureRequest) -> str:
    return backends.backend_url(request)


@pytest.fixture
async def backend(backend_url: str) -> AsyncIterator[Backend]:
    made = Backend(backend_url)
    yield made
    for broker in made.made:
        await broker.close()


async def publish(
    broker: Broker,
    room: str,
    body: object = None,
    *,
    key: str | None = None,
    durable: bool = False,
) -> PublishResult:
    msg_id = new_msg_id()
    fields = orjson.dumps({"msg_id": msg_id, "body": body})
    return await broker.publish(
        room,
        kind="message",
        name_key="room",
        msg_id=msg_id,
        fields=fields,
        idempotency_key=key,
        durable=durable,
    )


async def test_offsets_start_at_one_and_go_up_by_exactly_one(backend: Backend) -> None:
    node = await backend.node()
    room = channel()
    start = await node.broker.position(room)
    assert start.offset == 0
    assert await node.broker.position(room) == start  # the epoch is fixed before any publish
    results = [await publish(node.broker, room, i) for i in range(5)]
    assert [r.offset for r in results] == [1, 2, 3, 4, 5]
    assert {r.epoch for r in results} == {start.epoch}
    assert not any(r.duplicate for r in results)
    assert await node.broker.position(room) == Position(start.epoch, 5)


async def test_peek_position_reads_without_creating(backend: Backend) -> None:
    """Reads (history, presence) peek: an unknown channel stays unknown, so a stranger's
    reads leave nothing behind (issue 15)."""
    node = await backend.node()
    room = channel()
    assert await node.broker.peek_position(room) is None
    assert await node.broker.peek_position(room) is None
    # Still unknown: the first `position` starts the channel, and peek then agrees with it.
    start = await node.broker.position(room)
    assert start.offset == 0
    assert await node.broker.peek_position(room) == start
    await publish(node.broker, room)
    assert await node.broker.peek_position(room) == Position(start.epoch, 1)


async def test_frame_is_json_with_broker_fields_first(backend: Backend) -> None:
    node = await backend.node()
    room = "room:" + uuid.uuid4().hex[:8] + ":with:colons"
    fields = orjson.dumps({"msg_id": "M1", "user": {"id": "1"}, "body": {"text": 'hi "q" ü'}})
    result = await node.broker.publish(
        room, kind="message", name_key="room", msg_id="M1", fields=fields
    )
    name = room.removeprefix("room:")
    expected = (
        f'{{"type":"message","room":"{name}","epoch":"{result.epoch}","offset":1,'
        '"msg_id":"M1","user":{"id":"1"},"body":{"text":"hi \\"q\\" ü"}}'
    ).encode()
    assert result.frame == expected
    decoded = orjson.loads(result.frame)
    assert list(decoded) == ["type", "room", "epoch", "offset", "msg_id", "user", "body"]
    assert decoded["body"]["text"] == 'hi "q" ü'

    feed = 'feed:odd"name\\'
    empty = await node.broker.publish(
        feed, kind="update", name_key="feed", msg_id="M2", fields=b"{}"
    )
    assert orjson.loads(empty.frame) == {
        "type": "update",
        "feed": 'odd"name\\',
        "epoch": empty.epoch,
        "offset": 1,
    }
    assert list(orjson.loads(empty.frame)) == ["type", "feed", "epoch", "offset"]


async def test_publications_reach_subscribed_channels_in_order_on_every_node(
    backend: Backend,
) -> None:
    nodes = await backend.nodes(2)
    room, other, marker = channel(), channel(), channel()
    for node in nodes:
        await node.broker.subscribe(room)
        await node.broker.subscribe(room)  # idempotent
        await node.broker.subscribe(marker)
    sent = [await publish(nodes[i % len(nodes)].broker, room, i) for i in range(10)]
    await publish(nodes[0].broker, other, "nobody listens")
    await publish(nodes[0].broker, marker, "end")
    for node in nodes:
        await node.seen.until(lambda seen: len(seen.offsets(marker)) == 1)
        assert node.seen.offsets(room) == list(range(1, 11))
        assert [p.frame for p in node.seen.publications[room]] == [r.frame for r in sent]
        assert {p.epoch for p in node.seen.publications[room]} == {sent[0].epoch}
        assert other not in node.seen.publications

    for node in nodes:
        await node.broker.unsubscribe(room)
        await node.broker.unsubscribe(room)  # idempotent
    await publish(nodes[0].broker, room, "after")
    await publish(nodes[0].broker, marker, "end again")
    for node in nodes:
        await node.seen.until(lambda seen: len(seen.offsets(marker)) == 2)
        assert node.seen.offsets(room) == list(range(1, 11))


async def test_concurrent_publishes_get_contiguous_offsets_seen_in_order(
    backend: Backend,
) -> None:
    nodes = await backend.nodes(2)
    room = channel()
    for node in nodes:
        await node.broker.subscribe(room)
    results = await asyncio.gather(
        *(publish(nodes[i % len(nodes)].broker, room, i) for i in range(60))
    )
    assert sorted(r.offset for r in results) == list(range(1, 61))
    assert len({r.epoch for r in results}) == 1  # racing first publishes share one epoch
    by_offset = {r.offset: r.frame for r in results}
    for node in nodes:
        await node.seen.until(lambda seen: len(seen.offsets(room)) == 60)
        assert node.seen.offsets(room) == list(range(1, 61))
        assert all(p.frame == by_offset[p.offset] for p in node.seen.publications[room])


async def test_idempotent_publish_returns_the_first_and_sends_nothing(backend: Backend) -> None:
    nodes = await backend.nodes(2)
    room = channel()
    for node in nodes:
        await node.broker.subscribe(room)
    first = await publish(nodes[0].broker, room, "once", key="user-1:abc")
    again = await publish(nodes[-1].broker, room, "twice", key="user-1:abc")
    assert again.duplicate
    assert (again.epoch, again.offset, again.msg_id) == (first.epoch, first.offset, first.msg_id)
    assert again.frame == first.frame
    assert await nodes[0].broker.position(room) == Position(first.epoch, 1)

    elsewhere = await publish(nodes[0].broker, channel(), "same key, other room", key="user-1:abc")
    assert not elsewhere.duplicate
    after = await publish(nodes[0].broker, room, "next")
    assert after.offset == 2
    for node in nodes:
        await node.seen.until(lambda seen: seen.offsets(room) == [1, 2])


async def test_idempotency_keys_expire(backend: Backend) -> None:
    node = await backend.node(idempotency_ttl=0.2)
    room = channel()
    first = await publish(node.broker, room, key="k")
    assert (await publish(node.broker, room, key="k")).duplicate
    await asyncio.sleep(0.3)
    later = await publish(node.broker, room, key="k")
    assert not later.duplicate
    assert later.offset == first.offset + 1


async def test_recent_answers_only_what_it_can_prove(backend: Backend) -> None:
    node = await backend.node()
    room = channel()
    sent = [await publish(node.broker, room, i) for i in range(5)]
    epoch = sent[0].epoch

    recent = await node.broker.recent(room, Position(epoch, 2))
    assert recent is not None
    assert [p.offset for p in recent] == [3, 4, 5]
    assert [p.frame for p in recent] == [r.frame for r in sent[2:]]
    assert {(p.channel, p.epoch) for p in recent} == {(room, epoch)}
    everything = await node.broker.recent(room, Position(epoch, 0))
    assert everything is not None
    assert [p.offset for p in everything] == [1, 2, 3, 4, 5]
    assert await node.broker.recent(room, Position(epoch, 5)) == []

    assert await node.broker.recent(room, Position("0ther000", 2)) is None
    assert await node.broker.recent(room, Position(epoch, 6)) is None
    assert await node.broker.recent(room, Position(epoch, -1)) is None


async def test_recent_is_none_once_the_window_no_longer_reaches_back(backend: Backend) -> None:
    node = await backend.node(history_window=3)
    room = channel()
    sent = [await publish(node.broker, room, i) for i in range(5)]
    epoch = sent[0].epoch
    recent = await node.broker.recent(room, Position(epoch, 2))
    assert recent is not None
    assert [p.offset for p in recent] == [3, 4, 5]
    assert await node.broker.recent(room, Position(epoch, 1)) is None
    assert await node.broker.recent(room, Position(epoch, 0)) is None


async def test_recent_on_an_unknown_channel(backend: Backend) -> None:
    node = await backend.node()
    room = channel()
    assert await node.broker.recent(room, Position("abcdef01", 3)) is None
    position = await node.broker.position(room)
    assert await node.broker.recent(room, position) == []


async def test_last_frame(backend: Backend) -> None:
    node = await backend.node(history_window=2)
    room = channel()
    assert await node.broker.last_frame(room) is None
    await publish(node.broker, room, 1)
    last = await publish(node.broker, room, 2)
    assert await node.broker.last_frame(room) == last.frame
    last = await publish(node.broker, room, 3)
    assert await node.broker.last_frame(room) == last.frame


async def test_publish_event_reaches_subscribed_nodes_with_exclude_user(
    backend: Backend,
) -> None:
    nodes = await backend.nodes(2)
    room, other, marker = channel(), channel(), channel()
    for node in nodes:
        await node.broker.subscribe(room)
        await node.broker.subscribe(marker)
    typing = b'{"type":"typing","room":"x","user":{"id":"42","name":"ann"}}'
    await nodes[0].broker.publish_event(room, typing, exclude_user="42")
    await nodes[-1].broker.publish_event(room, b'{"type":"presence_diff"}', presence=True)
    await nodes[0].broker.publish_event(other, b'{"type":"typing"}')
    await nodes[0].broker.publish_event(marker, b"{}")
    for node in nodes:
        await node.seen.until(lambda seen: len(seen.events) == 2 and len(seen.presence) == 1)
        assert node.seen.events == [(room, typing, "42"), (marker, b"{}", None)]
        # Presence events come to a handler of their own: nobody parses frames to tell.
        assert node.seen.presence == [(room, b'{"type":"presence_diff"}')]
        assert node.seen.publications == {}  # events have no offset and no history
    assert (await nodes[0].broker.position(room)).offset == 0


async def test_seed_continues_an_epoch(backend: Backend) -> None:
    seeded_room, fresh_room = channel(), channel()
    calls: list[str] = []

    async def seed(name: str) -> Position | None:
        calls.append(name)
        await asyncio.sleep(0)
        return Position("abcd1234", 41) if name == seeded_room else None

    nodes = await backend.nodes(2, seed=seed)
    assert await nodes[-1].broker.position(seeded_room) == Position("abcd1234", 41)
    result = await publish(nodes[0].broker, seeded_room, "continues")
    assert (result.epoch, result.offset) == ("abcd1234", 42)
    assert orjson.loads(result.frame)["epoch"] == "abcd1234"
    recent = await nodes[-1].broker.recent(seeded_room, Position("abcd1234", 41))
    assert recent is not None
    assert [p.offset for p in recent] == [42]
    # What came before the seed is not in the window: not provably complete.
    assert await nodes[0].broker.recent(seeded_room, Position("abcd1234", 40)) is None
    assert calls == [seeded_room]  # asked once, only while the channel was unknown

    fresh = await publish(nodes[0].broker, fresh_room)
    assert fresh.offset == 1
    assert fresh.epoch != "abcd1234"


async def test_concurrent_first_publishes_with_a_seed_share_its_epoch(backend: Backend) -> None:
    async def seed(name: str) -> Position | None:
        await asyncio.sleep(0.01)
        return Position("feedbeef", 7)

    nodes = await backend.nodes(2, seed=seed)
    room = channel()
    results = await asyncio.gather(
        *(publish(nodes[i % len(nodes)].broker, room, i) for i in range(10))
    )
    assert {r.epoch for r in results} == {"feedbeef"}
    assert sorted(r.offset for r in results) == list(range(8, 18))


async def test_subscribe_unsubscribe_subscribe_is_live_when_it_returns(backend: Backend) -> None:
    node = await backend.node()
    room = channel()
    for _ in range(3):
        await node.broker.subscribe(room)
        await node.broker.unsubscribe(room)
    await node.broker.subscribe(room)
    result = await publish(node.broker, room)
    await node.seen.until(lambda seen: seen.offsets(room) == [result.offset])


async def test_close_leaves_no_tasks_behind(backend: Backend) -> None:
    before = asyncio.all_tasks()
    node = await backend.node()
    await node.broker.subscribe(channel())
    await publish(node.broker, channel())
    await node.broker.close()
    await node.broker.close()  # idempotent
    assert asyncio.all_tasks() == before


# Redis only: what a single process cannot show. ------------------------------------------


async def _kill_pubsub_connections(url: str, client_name: str) -> int:
    """Kills only this test's listener (by client id): other clients of a shared Redis,
    other tests' brokers included, keep their connections."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(url)
    try:
        clients = await admin.client_list(_type="pubsub")
        ids = [str(c["id"]) for c in clients if c.get("name") == client_name]
        for client_id in ids:
            await admin.client_kill_filter(_id=client_id)
    finally:
        await admin.aclose()
    return len(ids)


async def _count_pubsub_connections(url: str, client_name: str) -> int:
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(url)
    try:
        clients = await admin.client_list(_type="pubsub")
    finally:
        await admin.aclose()
    return sum(1 for c in clients if c.get("name") == client_name)


@pytest.mark.redis
async def test_listener_recovers_after_its_connection_is_killed(redis_url: str) -> None:
    node_id = f"kill-{uuid.uuid4().hex[:8]}"
    broker = RedisBroker(redis_url, node_id=node_id)
    bystander = RedisBroker(redis_url)
    seen, other = Recorder(), Recorder()
    try:
        await broker.start(seen)
        await bystander.start(other)
        room = channel()
        await broker.subscribe(room)
        await bystander.subscribe(room)
        await publish(broker, room)
        await eventually(lambda: seen.offsets(room) == [1])

        assert await _kill_pubsub_connections(redis_url, f"collab-{node_id}") == 1
        # The backoff before reconnecting (at least 50 ms) is far longer than a poll.
        await eventually(lambda: not broker.healthy)
        await eventually(lambda: seen.resubscribed == [[room]])
        assert broker.healthy
        await publish(bystander, room)
        await eventually(lambda: seen.offsets(room) == [1, 2])
        assert other.offsets(room) == [1, 2]
        assert other.resubscribed == []
        assert await _count_pubsub_connections(redis_url, f"collab-{node_id}") == 1
    finally:
        await broker.close()
        await bystander.close()


@pytest.mark.redis
async def test_everything_raises_unavailable_when_nothing_listens() -> None:
    broker = RedisBroker(f"redis://127.0.0.1:{free_port()}/0")
    try:
        await broker.start(Recorder())
        assert not broker.healthy
        room = channel()
        with pytest.raises(BrokerUnavailable):
            await publish(broker, room)
        with pytest.raises(BrokerUnavailable):
            await broker.publish_event(room, b"{}")
        with pytest.raises(BrokerUnavailable):
            await broker.position(room)
        with pytest.raises(BrokerUnavailable):
            await broker.recent(room, Position("abcdef01", 0))
        with pytest.raises(BrokerUnavailable):
            await broker.last_frame(room)
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe(room)
    finally:
        await broker.close()


@pytest.fixture
def own_redis(redis_url: str, tmp_path: Path) -> Iterator[RedisServer]:
    """Depends on `redis_url` only to skip (or fail in CI) where Redis is not installed."""
    require_redis_server()
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.mark.redis
async def test_restart_is_survived_with_a_new_epoch(own_redis: RedisServer) -> None:
    broker = RedisBroker(own_redis.url, node_id=f"restart-{os.getpid()}")
    seen = Recorder()
    try:
        await broker.start(seen)
        room = channel()
        await broker.subscribe(room)
        before = await publish(broker, room)
        await eventually(lambda: seen.offsets(room) == [1])

        own_redis.stop()
        await eventually(lambda: not broker.healthy)
        with pytest.raises(BrokerUnavailable):
            await publish(broker, room)
        late = channel()
        with pytest.raises(BrokerUnavailable):
            await broker.subscribe(late)  # recorded: subscribed once Redis is back

        own_redis.start()
        await eventually(lambda: broker.healthy and seen.resubscribed != [])
        assert seen.resubscribed == [sorted([room, late])]

        after = await publish(broker, room)
        assert after.offset == 1  # Redis lost everything: a new epoch tells the clients
        assert after.epoch != before.epoch
        assert await broker.recent(room, Position(before.epoch, 1)) is None
        await publish(broker, late)
        await eventually(lambda: seen.offsets(room) == [1, 1] and seen.offsets(late) == [1])
    finally:
        await broker.close()


@pytest.mark.redis
async def test_two_nodes_subscribing_alone_do_not_disturb_each_other(redis_url: str) -> None:
    """Each node has its own pub/sub connection; a node's unsubscribe is local."""
    first, second = RedisBroker(redis_url), RedisBroker(redis_url)
    a, b = Recorder(), Recorder()
    try:
        await first.start(a)
        await second.start(b)
        room, marker = channel(), channel()
        await first.subscribe(room)
        await first.subscribe(marker)
        await second.subscribe(room)
        await second.unsubscribe(room)
        await second.subscribe(room)
        await first.unsubscribe(room)
        result = await publish(first, room)
        await publish(second, marker)
        await eventually(lambda: b.offsets(room) == [result.offset])
        await eventually(lambda: a.offsets(marker) == [1])
        assert a.offsets(room) == []
    finally:
        await first.close()
        await second.close()


# --- the storage ledger -------------------------------------------------------------------------


async def held(broker: Broker, room: str, epoch: str, top: int) -> list[int]:
    return [p.offset for p in await broker.window(room, epoch, 1, top)]


async def test_a_durable_window_keeps_what_is_not_confirmed_stored(backend: Backend) -> None:
    node = await backend.node(history_window=5, max_unconfirmed=50)
    room, feed = channel(), channel("feed")
    sent = [await publish(node.broker, room, i, durable=True) for i in range(12)]
    for i in range(12):
        await publish(node.broker, feed, i)
    epoch = sent[0].epoch
    mark = await node.broker.storage_mark(room)
    assert mark is not None
    assert (mark.epoch, mark.top, mark.stored) == (epoch, 12, 0)
    # Nothing confirmed: all twelve are kept, though the window is five; a feed keeps five.
    window = await node.broker.window(room, epoch, 1, 12)
    assert [p.offset for p in window] == list(range(1, 13))
    assert [p.frame for p in window] == [r.frame for r in sent]
    feed_epoch = (await node.broker.position(feed)).epoch
    assert await held(node.broker, feed, feed_epoch, 12) == list(range(8, 13))
    assert room in await node.broker.unconfirmed()
    assert feed not in await node.broker.unconfirmed()

    # Confirming lets the confirmed part go, down to the recent window.
    mark = await node.broker.confirm_stored(room, epoch, 6)
    assert mark is not None and (mark.top, mark.stored) == (12, 6)
    assert await held(node.broker, room, epoch, 12) == list(range(7, 13))
    for i in range(3):
        await publish(node.broker, room, i, durable=True)
    assert await held(node.broker, room, epoch, 15) == list(range(7, 16))
    mark = await node.broker.confirm_stored(room, epoch, 15)
    assert mark is not None and mark.stored == 15
    assert await held(node.broker, room, epoch, 15) == list(range(11, 16))
    # Recovery reads the same window as before.
    recent = await node.broker.recent(room, Position(epoch, 12))
    assert recent is not None and [p.offset for p in recent] == [13, 14, 15]


async def test_the_storage_mark_never_goes_back_past_the_top_or_across_epochs(
    backend: Backend,
) -> None:
    node = await backend.node()
    room = channel()
    assert await node.broker.storage_mark(room) is None  # reading creates nothing
    assert await node.broker.confirm_stored(room, "e", 3) is None
    first = await publish(node.broker, room, durable=True)
    await publish(node.broker, room, durable=True)
    mark = await node.broker.confirm_stored(room, first.epoch, 99)
    assert mark is not None and (mark.top, mark.stored) == (2, 2)
    mark = await node.broker.confirm_stored(room, first.epoch, 1)
    assert mark is not None and mark.stored == 2
    await publish(node.broker, room, durable=True)
    mark = await node.broker.confirm_stored(room, "another-epoch", 3)
    assert mark is not None and (mark.top, mark.stored) == (3, 2)
    assert await node.broker.window(room, "another-epoch", 1, 3) == []


async def test_past_max_unconfirmed_the_oldest_go(backend: Backend) -> None:
    node = await backend.node(history_window=5, max_unconfirmed=10)
    room = channel()
    sent = [await publish(node.broker, room, i, durable=True) for i in range(25)]
    assert await held(node.broker, room, sent[0].epoch, 25) == list(range(16, 26))
    mark = await node.broker.storage_mark(room)
    assert mark is not None and mark.stored == 0  # lost, not confirmed: the reconciler says so


async def test_a_seeded_epoch_starts_confirmed_up_to_its_seed(backend: Backend) -> None:
    async def seed(_channel: str) -> Position:
        return Position("seeded", 40)

    node = await backend.node(seed=seed)
    room = channel()
    await publish(node.broker, room, durable=True)
    mark = await node.broker.storage_mark(room)
    assert mark is not None and (mark.epoch, mark.top, mark.stored) == ("seeded", 41, 40)


async def test_a_burst_beyond_any_connection_pool_is_carried_out(backend: Backend) -> None:
    """Thousands of sockets publish at once on a busy node: far more commands in flight than
    a Redis client keeps connections. They wait for a connection; none fails."""
    node = await backend.node()
    rooms = [channel() for _ in range(20)]
    results = await asyncio.gather(
        *(publish(node.broker, rooms[i % 20], i, durable=True) for i in range(1000)),
        *(node.broker.position(rooms[i % 20]) for i in range(200)),
    )
    published = [r for r in results if isinstance(r, PublishResult)]
    assert len(published) == 1000
    for room in rooms:
        assert sorted(r.offset for r in published if orjson.loads(r.frame)["room"] == room[5:]) == (
            list(range(1, 51))
        )


# --- room state expiry --------------------------------------------------------------------------

STATE_TTL = 0.5


async def gone(broker: Broker, room: str) -> bool:
    """The room's state expired (the memory broker drops it on its next read, as Redis does)."""
    await asyncio.sleep(STATE_TTL + 0.2)
    return await broker.peek_position(room) is None


async def test_idle_room_state_expires_and_comes_back_with_a_new_epoch(backend: Backend) -> None:
    """COLLAB_ROOM_STATE_TTL: a room nobody publishes to for that long is forgotten; it comes
    back in a new epoch at offset 1, so a client's old position cannot be recovered."""
    node = await backend.node(state_ttl=STATE_TTL)
    room, joined_only = channel(), channel()
    first = [await publish(node.broker, room, i) for i in range(3)]
    await node.broker.position(joined_only)  # created by a join, never published to
    assert await gone(node.broker, room)
    assert await node.broker.peek_position(joined_only) is None
    again = await publish(node.broker, room, "back")
    assert again.epoch != first[0].epoch and again.offset == 1
    assert await node.broker.recent(room, Position(first[0].epoch, 3)) is None
    assert await node.broker.last_frame(room) == again.frame


async def test_a_room_with_unconfirmed_messages_does_not_expire(backend: Backend) -> None:
    """The window is the reconciler's only copy of a message storage lost: a durable room
    holding unconfirmed messages keeps its state past the TTL, and expires once confirmed."""
    node = await backend.node(state_ttl=STATE_TTL)
    room = channel()
    sent = [await publish(node.broker, room, i, durable=True) for i in range(3)]
    epoch = sent[0].epoch
    await node.broker.confirm_stored(room, epoch, 2)  # one left unconfirmed
    assert not await gone(node.broker, room)
    assert await held(node.broker, room, epoch, 3) == [1, 2, 3]
    assert room in await node.broker.unconfirmed()
    mark = await node.broker.confirm_stored(room, epoch, 3)
    assert mark is not None and mark.stored == 3
    assert await gone(node.broker, room)
    assert await node.broker.storage_mark(room) is None
    # A publish after confirmation clears the expiry again until it is itself confirmed.
    fresh = await publish(node.broker, room, "new", durable=True)
    assert fresh.epoch != epoch and fresh.offset == 1
    assert not await gone(node.broker, room)
