"""The built-in `stats` feed: each node's numbers, once per interval, on a public feed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterator
from typing import TypeVar

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from collab.metrics import NodeCollector
from realtime.hub import SLICE, Hub
from realtime.stats import Stat
from realtime.transport import Outbox
from tests.processes import ServerProcess, server_env
from tests.test_direct_writes import member, published
from tests.test_hub_order import QuietBroker
from tests.wsclient import Client, guest_token

pytestmark = pytest.mark.slow

FIELDS = {
    "node",
    "connections",
    "rooms",
    "messages_in_per_second",
    "deliveries_per_second",
    "outgoing_queue_bytes",
    "storage_lag_seconds",
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("stats")
    env = server_env(
        folder, {"COLLAB_STATS_FEED_INTERVAL": "0.25", "COLLAB_NODE_ID": "stats-node-1"}
    )
    node = ServerProcess(env, folder / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


async def test_each_node_publishes_what_it_is_doing(server: ServerProcess) -> None:
    dashboard = await Client.connect(server.ws_url, guest_token(server.url, "dash"), "/ws/live")
    subscribed = await dashboard.request({"type": "subscribe", "feed": "stats"})
    assert subscribed["type"] == "subscribed"
    first = await dashboard.event("update", feed="stats")
    assert set(first["data"]) == FIELDS
    assert first["data"]["node"] == "stats-node-1"
    assert first["data"]["connections"] >= 1  # the dashboard itself
    # One update per interval, in order, each from this node.
    second = await dashboard.event("update", feed="stats")
    assert second["offset"] == first["offset"] + 1

    # A chat user in a room, publishing: the next updates count the room and the messages.
    chat = await Client.connect(server.ws_url, guest_token(server.url, "ann"))
    await chat.request({"type": "join", "room": "stats-room"})
    for n in range(20):
        await chat.request({"type": "publish", "room": "stats-room", "body": {"text": f"m{n}"}})
    seen: list[dict[str, float]] = []
    for _ in range(8):
        update = await dashboard.event("update", feed="stats")
        seen.append(update["data"])
        if update["data"]["messages_in_per_second"] > 0:
            break
    assert any(data["messages_in_per_second"] > 0 for data in seen), seen
    assert any(data["deliveries_per_second"] > 0 for data in seen), seen
    assert seen[-1]["rooms"] >= 1 and seen[-1]["connections"] >= 2
    assert all(data["outgoing_queue_bytes"] >= 0 for data in seen)


async def test_an_interval_of_0_publishes_nothing(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    folder = tmp_path_factory.mktemp("stats-off")
    env = server_env(folder, {"COLLAB_STATS_FEED_INTERVAL": "0"})
    node = ServerProcess(env, folder / "server.log").start()
    try:
        dashboard = await Client.connect(node.ws_url, guest_token(node.url, "dash"), "/ws/live")
        subscribed = await dashboard.request({"type": "subscribe", "feed": "stats"})
        assert subscribed["snapshot"] is None
        assert await dashboard.no_frame(lambda f: f.get("type") == "update", wait=1.5)
        await dashboard.close()
    finally:
        node.stop()


T = TypeVar("T")


async def with_turns_counted(work: Awaitable[T]) -> tuple[T, int]:
    """What `work` returns, and how many turns of the loop other work had meanwhile."""
    turns = 0

    async def other_work() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    worker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    before = turns
    try:
        return await work, turns - before
    finally:
        worker.cancel()


async def test_the_feed_counts_connections_a_slice_per_loop_turn() -> None:
    """Once a second, the feed adds up every connection; it must not hold up a message for
    the whole pass: other work runs between its slices, and the figures are those of
    `/metrics` (`Hub.stats`) all the same."""
    outbox = Outbox()
    hub = Hub(QuietBroker(), outbox=outbox)  # type: ignore[arg-type]
    for i in range(3 * SLICE + 1):
        member(hub, outbox, "room:a", f"m{i}")
    slow, proto, _ = member(hub, outbox, "room:a", "slow")
    proto.writable.clear()  # its transport paused: what it is sent waits in its queue
    hub.on_publication(published("room:a", 1))
    await asyncio.sleep(0)
    assert slow.backed_up

    sliced, during = await with_turns_counted(hub.stats_in_slices())
    assert during >= 3, "the loop ran nothing else while the feed counted 4 slices"
    assert sliced == hub.stats()
    figures = {stat.name: stat.value for stat in sliced}
    assert figures["connections"] == 3 * SLICE + 2
    assert figures["direct_write_connections"] == 3 * SLICE + 2
    assert figures["backed_up_connections"] == 1
    assert figures["outgoing_queue_bytes"] == len(b'{"type":"message","offset":1}')


class _HubFigures:
    """What the metrics collector asks of a node, answered by a bare hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    async def stats_in_slices(self) -> list[Stat]:
        return await self.hub.stats_in_slices()


async def test_a_metrics_scrape_counts_connections_a_slice_per_loop_turn() -> None:
    """`/metrics` adds up every connection on every scrape, as the feed does once a second:
    it must not hold a message up for the whole pass either, and its text carries the very
    figures of `Hub.stats`."""
    outbox = Outbox()
    hub = Hub(QuietBroker(), outbox=outbox)  # type: ignore[arg-type]
    for i in range(3 * SLICE + 1):
        member(hub, outbox, "room:a", f"m{i}")
    collector = NodeCollector(lambda: _HubFigures(hub))  # type: ignore[arg-type,return-value]
    registry = CollectorRegistry()
    registry.register(collector)
    scraped, during = await with_turns_counted(collector.scrape(registry))
    text = scraped.decode()
    assert during >= 3, "the loop ran nothing else while the scrape counted 4 slices"
    figures = hub.stats()
    assert {stat.name: stat.value for stat in figures}["connections"] == 3 * SLICE + 1
    for stat in figures:
        sample = f"collab_{stat.name}{'_total' if stat.kind == 'counter' else ''}"
        assert f"\n{sample} {float(stat.value)}\n" in text, stat.name
    assert b"collab_connections" not in generate_latest(registry)  # counted only for a scrape
