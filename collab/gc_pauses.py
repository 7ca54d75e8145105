"""Garbage-collector pauses kept out of the fan-out: what stays is frozen.

CPython's full (generation 2) collection walks every tracked object, and the event loop
waits meanwhile. A node holding thousands of connections holds hundreds of thousands of
such objects (each connection's protocol, queues and task; each user's presence entry,
account and token), so one full pass stops every delivery for the whole walk: measured at
2,000 guests in one room, passes of 0.5-1.5 s on a loaded machine, every few seconds while
they arrived and then at whatever moment the objects promoted by the crowd's churn
reached CPython's threshold (a quarter of the long-lived objects). A message published
during such a pass reaches the room only after it, and in a room of 2,000 one late
message is 10% of the deliveries of a second: the p99 of a run *is* the pause, in the runs
where a pass falls into them (issue 10: 159 and 170 ms in two runs of three, 28 ms in the
third).

So the objects that stay are frozen (`gc.freeze()`: moved to the permanent generation,
which no collection walks; reference counting still frees them): everything built by
start-up, then, once a second while connections arrive, whatever outlived a young
collection. Collections then walk only what is new since, and stay short.

Frozen objects that become cyclic garbage (a closed connection's reference cycles) wait
for a full collection over everything (unfreeze, collect, freeze again). It runs when the
connections closed since the last one reach a quarter of those open (CPython's own 25%
rule, counted in connections, the unit of long-lived state here, rather than in objects),
or when the frozen objects have doubled since the last one: so frozen garbage stays a
fraction of the live state, and a full pass comes with departures and crowds, not with
message traffic.

The doubling is acted on in the very step that froze the crowd's objects, while connections
are still arriving, never a step later: a crowd is followed by messages to it, and a pass
over everything (hundreds of milliseconds at a few thousand connections) that lands a
second after the last arrival stops the first deliveries to the whole crowd (measured: a
p99 of 220 ms in one run of three, 2,000 guests then 10 messages a second).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Callable
from typing import NamedTuple

__all__ = ["ConnectionCounts", "GcFreezer"]

log = logging.getLogger("collab.gc")


class ConnectionCounts(NamedTuple):
    opened: int  # connections opened since start
    closed: int  # ...and closed since start
    open: int  # open now


class GcFreezer:
    """Freezes the long-lived objects of a server; `counts` says how connections come and go."""

    def __init__(
        self,
        counts: Callable[[], ConnectionCounts],
        *,
        interval: float = 1.0,
        closed_fraction: float = 0.25,
        min_closed: int = 100,
    ) -> None:
        self.counts = counts
        self.interval = interval
        self.closed_fraction = closed_fraction
        self.min_closed = min_closed
        self.full_collections = 0
        self.freezes = 0
        self.longest_full_ms = 0.0
        self._opened = 0
        self._closed_at_full = 0
        self._frozen_at_full = 0
        self._frozen = 0  # objects frozen, as last counted
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Freeze what start-up built, then watch the connections once every `interval`."""
        self.full_collection()
        self._opened = self.counts().opened
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        gc.unfreeze()  # the process may go on (tests): its objects are collectable again

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.tick()
            except Exception:  # never let this stop: without it, pauses come back, no more
                log.exception("garbage collector step failed")

    def tick(self) -> None:
        """One step: a full collection when it is due, else freeze what new connections built."""
        counts = self.counts()
        closed = counts.closed - self._closed_at_full
        if closed >= max(self.min_closed, self.closed_fraction * counts.open):
            self.full_collection()
        elif counts.opened != self._opened:
            # A young collection first, so that young cyclic garbage is not frozen with the rest.
            gc.collect(1)
            # Counted before they join the frozen ones: `gc.get_freeze_count()` would walk
            # every frozen object (CPython keeps no count), a stall of milliseconds per
            # 100,000 at each step of a crowd; this lists only what is about to be frozen.
            self._frozen += len(gc.get_objects())
            gc.freeze()
            self.freezes += 1
            if self._frozen > 2 * max(self._frozen_at_full, 1):
                self.full_collection()  # now, while the crowd is still at the door
        self._opened = counts.opened

    def full_collection(self) -> None:
        started = time.perf_counter()
        gc.unfreeze()
        gc.collect()
        gc.freeze()
        took = (time.perf_counter() - started) * 1000
        self.longest_full_ms = max(self.longest_full_ms, took)
        self.full_collections += 1
        counts = self.counts()
        self._closed_at_full = counts.closed
        self._frozen_at_full = self._frozen = gc.get_freeze_count()
        log.debug(
            "full collection over %d objects in %.1f ms (%d connections open)",
            self._frozen_at_full,
            took,
            counts.open,
        )
