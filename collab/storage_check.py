"""`collab storage check`: acknowledged against stored, for an operator to see with their own eyes.

Offsets are contiguous per room and epoch, so every hole is computable:

- inside what is stored: an offset missing between two stored ones (or before the first);
- at the tail: offsets the broker has published (its room counter, Redis only) above the
  newest stored one.

A missing offset the broker's window still holds is *repairable* (`--repair` stores it
through the idempotent path, as the reconciler would); one it no longer holds is *lost*.
Offsets younger than the grace period are in flight, not missing. Messages the database
refused are listed as set aside, with the reason, and are not gaps: they are accounted for.
Exit status 1 when a gap remains, 0 otherwise.
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy import func, literal, select, union_all

from collab.settings import Settings
from persistence.database import SessionFactory, create_engine, create_session_factory
from persistence.history import DatabaseHistory, parse_ts
from persistence.ledger import DatabaseLedger
from persistence.models import Message, SetAsideMessage
from realtime.broker import Broker
from realtime.broker_memory import MemoryBroker
from realtime.reconciler import ROOM, spans
from realtime.storage import StoredMessage

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """`90`, `90s`, `15m`, `2h`, `7d` -> seconds."""
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (use 90s, 15m, 2h or 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class Gap:
    room: str
    epoch: str
    first: int
    last: int
    repairable: list[int] = field(default_factory=list)  # offsets the window still holds

    @property
    def size(self) -> int:
        return self.last - self.first + 1


@dataclass
class Report:
    rooms: int = 0
    gaps: list[Gap] = field(default_factory=list)
    set_aside: list[tuple[str, str, int, str]] = field(default_factory=list)
    repaired: int = 0
    in_flight: int = 0
    notes: list[str] = field(default_factory=list)


async def _rooms(sessions: SessionFactory, since: datetime | None, broker: Broker) -> list[str]:
    query = select(Message.room).distinct()
    if since is not None:
        query = query.where(Message.created_at >= since)
    async with sessions() as session:
        names = set((await session.scalars(query)).all())
    names.update(c[len(ROOM) :] for c in await broker.unconfirmed(1_000_000) if c.startswith(ROOM))
    return sorted(names)


async def _interior_gaps(
    sessions: SessionFactory, room: str, since: datetime | None
) -> list[tuple[str, int, int]]:
    """(epoch, first, last) of every run of offsets missing below a stored or set-aside one."""
    stored = union_all(
        select(Message.epoch, Message.offset, Message.created_at).where(Message.room == room),
        select(SetAsideMessage.epoch, SetAsideMessage.offset, SetAsideMessage.created_at).where(
            SetAsideMessage.room == room
        ),
    ).subquery()
    previous = func.lag(stored.c.offset, 1, literal(0)).over(
        partition_by=stored.c.epoch, order_by=stored.c.offset
    )
    ordered = select(
        stored.c.epoch, stored.c.offset, previous.label("previous"), stored.c.created_at
    ).subquery()
    query = select(ordered.c.epoch, ordered.c.previous, ordered.c.offset).where(
        ordered.c.offset - ordered.c.previous > 1
    )
    if since is not None:
        query = query.where(ordered.c.created_at >= since)
    async with sessions() as session:
        rows = (await session.execute(query)).all()
    return [(str(epoch), int(prev) + 1, int(offset) - 1) for epoch, prev, offset in rows]


async def _newest(sessions: SessionFactory, room: str, epoch: str) -> int:
    async with sessions() as session:
        parts = [
            select(func.max(t.offset)).where(t.room == room, t.epoch == epoch)
            for t in (Message, SetAsideMessage)
        ]
        values = [await session.scalar(part) for part in parts]
    return max((int(v) for v in values if v is not None), default=0)


async def _set_aside(
    sessions: SessionFactory, room: str, since: datetime | None
) -> list[tuple[str, str, int, str]]:
    query = select(
        SetAsideMessage.room, SetAsideMessage.epoch, SetAsideMessage.offset, SetAsideMessage.reason
    ).where(SetAsideMessage.room == room)
    if since is not None:
        query = query.where(SetAsideMessage.created_at >= since)
    async with sessions() as session:
        return [(r, e, int(o), reason) for r, e, o, reason in (await session.execute(query)).all()]


async def check(
    settings: Settings,
    *,
    rooms: list[str] | None = None,
    since: float | None = None,
    repair: bool = False,
    grace: float | None = None,
) -> Report:
    from collab.realtime_wiring import build_backends

    engine = create_engine(settings.database_url)
    sessions = create_session_factory(engine)
    broker, presence, user_connections = build_backends(settings, DatabaseHistory(sessions))
    ledger = DatabaseLedger(sessions)
    grace = settings.reconcile_grace if grace is None else grace
    cutoff = datetime.now(UTC) - timedelta(seconds=since) if since is not None else None
    report = Report()
    if isinstance(broker, MemoryBroker):
        report.notes.append(
            "the embedded broker lives in the server process: only stored history is checked "
            "(what is published but not yet stored is the running server's reconciler's)"
        )
    await broker.start(_Quiet())
    try:
        names = rooms or await _rooms(sessions, cutoff, broker)
        report.rooms = len(names)
        for name in names:
            await _check_room(broker, sessions, ledger, name, cutoff, grace, repair, report)
    finally:
        await broker.close()
        await presence.close()
        await user_connections.close()
        await engine.dispose()
    return report


async def _check_room(
    broker: Broker,
    sessions: SessionFactory,
    ledger: DatabaseLedger,
    room: str,
    since: datetime | None,
    grace: float,
    repair: bool,
    report: Report,
) -> None:
    channel = ROOM + room
    holes = await _interior_gaps(sessions, room, since)
    mark = await broker.storage_mark(channel)
    if mark is not None:
        newest = await _newest(sessions, room, mark.epoch)
        if mark.top > newest:
            holes.append((mark.epoch, newest + 1, mark.top))
    report.set_aside.extend(await _set_aside(sessions, room, since))
    now = time.time()
    for epoch, first, last in holes:
        held: dict[int, bytes] = {}
        if mark is not None and epoch == mark.epoch:
            held = {p.offset: p.frame for p in await broker.window(channel, epoch, first, last)}
        young = {o for o, frame in held.items() if _age(frame, now) < grace}
        report.in_flight += len(young)
        offsets = [o for o in range(first, last + 1) if o not in young]
        if not offsets:
            continue
        missing = set(offsets) - await ledger.accounted(room, epoch, first, last)
        repairable = sorted(o for o in missing if o in held)
        if repair and repairable:
            messages = [StoredMessage.from_event(orjson.loads(held[o])) for o in repairable]
            outcome = await ledger.restore(messages)
            report.repaired += outcome.written + outcome.set_aside
            missing -= set(repairable)
            repairable = []
        for start, end in spans(sorted(missing)):
            gap = Gap(room, epoch, start, end, [o for o in repairable if start <= o <= end])
            report.gaps.append(gap)


def _age(frame: bytes, now: float) -> float:
    try:
        return now - parse_ts(str(orjson.loads(frame)["ts"])).timestamp()
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return float("inf")


class _Quiet:
    """The check subscribes to nothing; a broker still wants a handler."""

    def on_publication(self, publication: object) -> None:
        return None

    def on_event(self, channel: str, frame: bytes, exclude_user: str | None) -> None:
        return None

    def on_presence(self, channel: str, frame: bytes) -> None:
        return None

    def on_resubscribed(self, channels: list[str]) -> None:
        return None


def render(report: Report, repair: bool) -> str:
    lines = [f"note: {note}" for note in report.notes]
    for gap in report.gaps:
        what = (
            f"{len(gap.repairable)} still in the broker's window (run with --repair)"
            if gap.repairable
            else "lost: no longer in the broker's window"
        )
        lines.append(
            f"GAP room {gap.room} epoch {gap.epoch}: offsets {gap.first}-{gap.last} "
            f"({gap.size} not stored; {what})"
        )
    for room, epoch, offset, reason in report.set_aside:
        lines.append(f"SET ASIDE room {room} epoch {epoch} offset {offset}: {reason}")
    missing = sum(g.size for g in report.gaps)
    summary = (
        f"{report.rooms} rooms checked: {len(report.gaps)} gaps ({missing} messages), "
        f"{len(report.set_aside)} set aside, {report.in_flight} in flight"
    )
    if repair:
        summary += f", {report.repaired} stored again"
    lines.append(summary)
    return "\n".join(lines)


def run(settings: Settings, rooms: list[str] | None, since: str | None, repair: bool) -> int:
    """The command's body: print the report; the exit status."""
    seconds = parse_duration(since) if since is not None else None
    report = asyncio.run(check(settings, rooms=rooms, since=seconds, repair=repair))
    print(render(report, repair))
    return 1 if report.gaps else 0
