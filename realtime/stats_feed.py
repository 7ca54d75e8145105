"""The built-in `stats` feed: what each node is doing, published once per interval.

Each node publishes its own update, named by its node id, so a dashboard sums over the nodes
it has heard from (`/live` does). Counters (`messages_published`, `deliveries`) become rates
over the time since the previous update; gauges are read as they are. Everything comes from
`Node.stats_in_slices()` (`realtime.stats`), the same numbers `/metrics` serves, counted a
slice of connections per loop turn: once a second, a pass over every connection in one go
would hold up whatever message arrived meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

from realtime.stats import Stat

log = logging.getLogger("collab.stats_feed")

STATS_FEED = "stats"


class StatsSource(Protocol):
    """What the publisher needs of a node (`realtime.node.Node`, which it may not import)."""

    node_id: str

    async def stats_in_slices(self) -> list[Stat]: ...

    async def publish_feed(self, feed: str, data: Any) -> object: ...


class StatsPublisher:
    def __init__(self, node: StatsSource, interval: float, feed: str = STATS_FEED) -> None:
        self.node = node
        self.interval = interval
        self.feed = feed
        self._previous: tuple[float, float, float] | None = None  # (time, published, delivered)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def sample(self, now: float) -> dict[str, Any]:
        """One update's data; the first reports rates of 0 (there is nothing to compare to)."""
        values = {stat.name: stat.value for stat in await self.node.stats_in_slices()}
        published = values.get("messages_published", 0.0)
        delivered = values.get("deliveries", 0.0)
        messages_rate = deliveries_rate = 0.0
        if self._previous is not None:
            then, published_then, delivered_then = self._previous
            elapsed = max(now - then, 1e-6)
            messages_rate = (published - published_then) / elapsed
            deliveries_rate = (delivered - delivered_then) / elapsed
        self._previous = (now, published, delivered)
        return {
            "node": self.node.node_id,
            "connections": int(values.get("connections", 0)),
            "rooms": int(values.get("rooms", 0)),
            "messages_in_per_second": round(messages_rate, 3),
            "deliveries_per_second": round(deliveries_rate, 3),
            "outgoing_queue_bytes": int(values.get("outgoing_queue_bytes", 0)),
            # Oldest publish not yet confirmed stored (the reconciler's view); 0 when none.
            "storage_lag_seconds": round(values.get("storage_lag_seconds", 0.0), 3),
        }

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        failing = False
        while True:
            try:
                await self.node.publish_feed(self.feed, await self.sample(loop.time()))
                if failing:
                    log.info("stats feed publishing again")
                failing = False
            except Exception:
                # The broker is down or restarting: the next tick tries again. Logged once
                # per outage, not once a second.
                if not failing:
                    log.warning("stats feed not published; retrying every %ss", self.interval)
                failing = True
            # Sleeping after publishing, not on a fixed schedule: a slow publish delays the
            # next one rather than letting updates bunch up.
            await asyncio.sleep(self.interval)
