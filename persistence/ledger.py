"""The reconciler's view of storage (`realtime.storage.StorageLedger`) over the database."""

from __future__ import annotations

from sqlalchemy import Select, func, select, union

from persistence.database import SessionFactory
from persistence.history import to_row
from persistence.models import Message, SetAsideMessage
from persistence.writer import write_messages
from realtime.storage import RestoreOutcome, StorageLedger, StoredMessage


def _accounted_offsets(room: str, epoch: str, first: int, last: int) -> Select[int]:
    """Offsets of a range that are stored or set aside, each once (a UNION, not UNION ALL:
    an offset in both tables must not make up for one missing from both)."""
    tables = (Message, SetAsideMessage)
    parts = [
        select(t.offset.label("offset")).where(
            t.room == room, t.epoch == epoch, t.offset >= first, t.offset <= last
        )
        for t in tables
    ]
    return union(*parts)  # type: ignore[return-value]


class DatabaseLedger(StorageLedger):
    def __init__(self, sessions: SessionFactory) -> None:
        self.sessions = sessions

    async def count_accounted(self, room: str, epoch: str, first: int, last: int) -> int:
        offsets = _accounted_offsets(room, epoch, first, last).subquery()
        async with self.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(offsets)) or 0)

    async def accounted(self, room: str, epoch: str, first: int, last: int) -> set[int]:
        async with self.sessions() as session:
            rows = await session.scalars(_accounted_offsets(room, epoch, first, last))
            return {int(offset) for offset in rows}

    async def restore(self, messages: list[StoredMessage]) -> RestoreOutcome:
        outcome = await write_messages(self.sessions, [to_row(m) for m in messages])
        return RestoreOutcome(written=outcome.written, set_aside=len(outcome.set_aside))
