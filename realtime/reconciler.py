"""The reconciler: every message a room published ends up stored, whatever lost it on the way.

Storage is asynchronous, and the path to it has holes no acknowledgement can close: kombu's
Redis transport pops a Celery message and records it as unacknowledged in two separate steps
(a worker killed between them loses the batch for good), a database may refuse a write after
the message went out to every member, a sink may time out. What closes them is arithmetic.
Offsets are contiguous per room and epoch, so "published but not stored" is a set of numbers
anyone can compute, and the broker's window keeps every publication of a room until it is
confirmed stored (`realtime.broker`, storage marks).

Each pass, for each room the broker names as unconfirmed:

1. Read the room's storage mark (epoch, top offset, offsets confirmed up to).
2. Take as due only what was published at least `grace` seconds ago (by this node's own
   samples of the top, so clocks never matter): younger messages are still on their way.
3. Count what storage has of the due range; only when something is missing, ask which
   offsets, take them from the window and store them through the idempotent path.
4. An offset neither stored nor in the window any more is lost: it is logged at ERROR and
   counted (`collab_storage_lost_total`), never skipped silently.
5. Confirm the range, so the broker can let it go from the window.

Every node runs one; a short claim in the broker keeps two nodes off the same room. A pass
costs one broker read per unconfirmed room and one indexed count per due room: nothing per
message while storage keeps up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field

import orjson

from realtime.broker import Broker, BrokerUnavailable, StorageMark
from realtime.stats import Stat, gauge
from realtime.storage import StorageLedger, StoredMessage

log = logging.getLogger("collab.storage")

ROOM = "room:"


@dataclass
class PassReport:
    """What one pass over the unconfirmed rooms found and did."""

    rooms: int = 0
    verified: int = 0  # offsets confirmed this pass
    restored: int = 0  # stored again from the window
    set_aside: int = 0  # refused by the database while being stored again
    lost: list[tuple[str, str, int, int]] = field(default_factory=list)  # room, epoch, first, last


@dataclass
class _Room:
    """This node's samples of a room's top offset: (monotonic time, epoch, top)."""

    samples: deque[tuple[float, str, int]] = field(default_factory=deque)
    unconfirmed_since: float | None = None


class Reconciler:
    """Finds publications of durable channels that storage does not have, and stores them."""

    def __init__(
        self,
        broker: Broker,
        ledger: StorageLedger,
        *,
        grace: float = 60.0,
        interval: float = 5.0,
        max_per_pass: int = 10_000,
    ) -> None:
        self.broker = broker
        self.ledger = ledger
        self.grace = grace
        self.interval = interval
        self.max_per_pass = max_per_pass
        self._rooms: dict[str, _Room] = {}
        self._task: asyncio.Task[None] | None = None
        # Counters for `/metrics` (see `collab.metrics`).
        self.passes = 0
        self.verified = 0
        self.restored = 0
        self.set_aside = 0
        self.lost = 0
        self.failures = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="reconciler")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_pass()
            except (BrokerUnavailable, OSError) as exc:
                self.failures += 1
                if not failing:  # one line per outage, not one per pass
                    log.warning("storage reconciliation paused: %s", exc)
                failing = True
                continue
            except Exception as exc:
                # The database is away (SQLAlchemy's errors are not imported here), or a bug:
                # either way the next pass tries again, and the lag metric shows it.
                self.failures += 1
                if not failing:
                    log.warning("storage reconciliation failed, retrying: %r", exc)
                failing = True
                continue
            if failing:
                log.info("storage reconciliation resumed")
            failing = False

    def stats(self) -> list[Stat]:
        """What it verified, restored and lost (`realtime.stats`)."""
        return [
            Stat(
                "storage_verified",
                "Published offsets the reconciler confirmed stored",
                self.verified,
            ),
            Stat(
                "storage_restored",
                "Messages the reconciler stored again from the broker's window",
                self.restored,
            ),
            Stat(
                "storage_set_aside",
                "Messages the database refused while the reconciler stored them",
                self.set_aside,
            ),
            Stat(
                "storage_lost",
                "Published messages neither stored nor in the window any more",
                self.lost,
            ),
            Stat(
                "storage_failures",
                "Reconciler passes that failed (broker or database unavailable)",
                self.failures,
            ),
            gauge(
                "storage_lag_seconds",
                "Age of the oldest published message not yet confirmed stored, as this node's "
                "reconciler saw it (includes the grace period; alert well above it)",
                self.lag,
            ),
        ]

    @property
    def lag(self) -> float:
        """Seconds since the oldest publication this node knows to be unconfirmed was first
        seen unconfirmed: the persistence lag an operator alerts on (0 when none)."""
        now = time.monotonic()
        oldest = min(
            (r.unconfirmed_since for r in self._rooms.values() if r.unconfirmed_since is not None),
            default=None,
        )
        return 0.0 if oldest is None else now - oldest

    # -- the work --------------------------------------------------------------------------------

    async def run_pass(self, grace: float | None = None) -> PassReport:
        """One pass over every unconfirmed room. `grace` overrides the setting (an operator's
        repair takes everything published up to now)."""
        report = PassReport()
        grace = self.grace if grace is None else grace
        channels = [c for c in await self.broker.unconfirmed() if c.startswith(ROOM)]
        report.rooms = len(channels)
        seen = set(channels)
        for channel in list(self._rooms):
            if channel not in seen:
                del self._rooms[channel]
        for channel in channels:
            await self.reconcile(channel, grace, report)
        self.passes += 1
        return report

    async def reconcile(self, channel: str, grace: float, report: PassReport) -> None:
        mark = await self.broker.storage_mark(channel)
        if mark is None:
            self._rooms.pop(channel, None)
            return
        now = time.monotonic()
        room = self._rooms.setdefault(channel, _Room())
        samples = room.samples
        while samples and samples[0][1] != mark.epoch:
            samples.popleft()  # another epoch: its offsets mean nothing now
        samples.append((now, mark.epoch, mark.top))
        if mark.stored >= mark.top:
            room.unconfirmed_since = None
            samples.clear()
            await self.broker.confirm_stored(channel, mark.epoch, mark.top)  # lets it go
            return
        room.unconfirmed_since = _first_above(samples, mark.stored)
        # The newest sample old enough to be due; older ones are no longer needed.
        due = 0
        while samples and now - samples[0][0] >= grace:
            due = samples[0][2]
            if len(samples) > 1 and now - samples[1][0] >= grace:
                samples.popleft()
            else:
                break
        if grace <= 0:
            due = mark.top
        if due <= mark.stored:
            return
        if not await self.broker.claim(channel, max(self.interval * 3, 1.0)):
            return
        last = min(due, mark.stored + self.max_per_pass)
        await self._verify(channel, mark, last, report)

    async def _verify(self, channel: str, mark: StorageMark, last: int, report: PassReport) -> None:
        room_name = channel[len(ROOM) :]
        first = mark.stored + 1
        expected = last - first + 1
        have = await self.ledger.count_accounted(room_name, mark.epoch, first, last)
        if have < expected:
            accounted = await self.ledger.accounted(room_name, mark.epoch, first, last)
            missing = [o for o in range(first, last + 1) if o not in accounted]
            await self._restore(channel, room_name, mark.epoch, missing, report)
        confirmed = await self.broker.confirm_stored(channel, mark.epoch, last)
        report.verified += expected
        self.verified += expected
        state = self._rooms.get(channel)
        if state is not None and confirmed is not None:
            state.unconfirmed_since = _first_above(state.samples, confirmed.stored)

    async def _restore(
        self, channel: str, room: str, epoch: str, missing: list[int], report: PassReport
    ) -> None:
        if not missing:
            return
        held = {
            p.offset: p.frame
            for p in await self.broker.window(channel, epoch, missing[0], missing[-1])
        }
        messages: list[StoredMessage] = []
        lost: list[int] = []
        for offset in missing:
            frame = held.get(offset)
            message = _decode(frame) if frame is not None else None
            if message is None:
                lost.append(offset)
            else:
                messages.append(message)
        if messages:
            outcome = await self.ledger.restore(messages)
            report.restored += outcome.written
            report.set_aside += outcome.set_aside
            self.restored += outcome.written
            self.set_aside += outcome.set_aside
            log.warning(
                "room %s epoch %s: %d published messages were not stored; stored them again "
                "from the broker's window (offsets %s)",
                room,
                epoch,
                len(messages),
                _ranges([m.offset for m in messages]),
            )
        if lost:
            self.lost += len(lost)
            for first, last in spans(lost):
                report.lost.append((room, epoch, first, last))
            log.error(
                "room %s epoch %s: %d published messages are lost: not stored and no longer "
                "in the broker's window (offsets %s)",
                room,
                epoch,
                len(lost),
                _ranges(lost),
            )


def _first_above(samples: deque[tuple[float, str, int]], stored: int) -> float | None:
    """When this node first saw the room's top above `stored`, as far as its samples go."""
    for seen, _, top in samples:
        if top > stored:
            return seen
    return None


def _decode(frame: bytes) -> StoredMessage | None:
    try:
        return StoredMessage.from_event(orjson.loads(frame))
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        log.error("a frame in the broker's window is not a message: %r", frame[:200])
        return None


def spans(offsets: list[int]) -> list[tuple[int, int]]:
    """Sorted offsets as runs: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    spans: list[tuple[int, int]] = []
    for offset in offsets:
        if spans and spans[-1][1] == offset - 1:
            spans[-1] = (spans[-1][0], offset)
        else:
            spans.append((offset, offset))
    return spans


def _ranges(offsets: list[int]) -> str:
    return ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in spans(offsets))
