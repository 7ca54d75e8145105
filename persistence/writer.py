"""Writing accepted messages: the one idempotent path every writer takes.

The embedded sink, the Celery task and the reconciler all store messages here. Two promises:

- A message already stored (same `msg_id`) is skipped, so a batch delivered twice, or
  re-stored by the reconciler while a worker stores it too, writes nothing twice.
- A row the database refuses does not hold back the rows around it. What counts as refused is
  read from the error's SQLSTATE class where the driver gives one (PostgreSQL: class 22, data
  exception, and 23, integrity violation), and from SQLAlchemy's mapping of the driver's error
  otherwise: asyncpg's "invalid byte sequence" (22021) arrives as a plain `DBAPIError`, so the
  exception type alone would take it for an outage and retry the batch for ever. Refused rows
  are set aside (`set_aside_messages`) with the database's reason; every other error is
  raised, for the caller to retry later.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError

from persistence.database import SessionFactory
from persistence.models import SetAsideMessage, utcnow
from persistence.repositories import MessageRepository, insert_skipping_duplicates

log = logging.getLogger("collab.persistence")

# SQLSTATE classes that say "this data is wrong", not "the database is away".
_ROW_CLASSES = ("22", "23")
_MAX_REASON = 500


def sqlstate(exc: BaseException) -> str | None:
    """The five-character SQLSTATE of a database error, when the driver reports one."""
    orig = getattr(exc, "orig", None)
    for source in (orig, exc):
        for name in ("sqlstate", "pgcode"):
            value = getattr(source, name, None)
            if isinstance(value, str) and len(value) == 5:
                return value
    return None


def refused_row(exc: BaseException) -> bool:
    """True when the database refuses the data itself; retrying the same row cannot help."""
    if not isinstance(exc, DBAPIError):
        return False
    state = sqlstate(exc)
    if state is not None:
        return state[:2] in _ROW_CLASSES
    return isinstance(exc, IntegrityError | DataError)


def reason_of(exc: BaseException) -> str:
    """The database's own words, without the statement and its parameters."""
    text = str(getattr(exc, "orig", None) or exc)
    first = text.splitlines()[0] if text else type(exc).__name__
    state = sqlstate(exc)
    return (f"[{state}] {first}" if state else first)[:_MAX_REASON]


@dataclass
class WriteOutcome:
    """What one write did: rows new to the table, and rows set aside with their reasons."""

    written: int = 0
    set_aside: list[tuple[dict[str, Any], str]] = field(default_factory=list)


async def write_messages(sessions: SessionFactory, rows: Sequence[dict[str, Any]]) -> WriteOutcome:
    """Store `rows` (skipping stored ids); set aside the ones the database refuses.

    Raises the database's error when it is unavailable (or anything else goes wrong that is
    not about one row): nothing of the batch is then known to be stored, and the caller
    tries again later.
    """
    if not rows:
        return WriteOutcome()
    try:
        async with sessions() as session:
            written = await MessageRepository(session).insert_many(rows)
            await session.commit()
        return WriteOutcome(written=written)
    except DBAPIError as exc:
        if not refused_row(exc):
            raise
        log.warning(
            "a batch of %d has a row the database refuses (%s); storing row by row",
            len(rows),
            reason_of(exc),
        )
    outcome = WriteOutcome()
    for row in rows:
        try:
            async with sessions() as session:
                outcome.written += await MessageRepository(session).insert_many([row])
                await session.commit()
        except DBAPIError as exc:
            if not refused_row(exc):
                raise
            outcome.set_aside.append((row, reason_of(exc)))
    if outcome.set_aside:
        await _set_aside(sessions, outcome.set_aside)
    return outcome


async def _set_aside(sessions: SessionFactory, refused: list[tuple[dict[str, Any], str]]) -> None:
    records = []
    for row, reason in refused:
        log.error(
            "message %s (room %s, epoch %s, offset %s) refused by the database, set aside: %s",
            row["msg_id"],
            row["room"],
            row["epoch"],
            row["offset"],
            reason,
        )
        records.append(
            {
                "msg_id": row["msg_id"],
                "room": row["room"],
                "epoch": row["epoch"],
                "offset": row["offset"],
                "reason": reason,
                # orjson escapes control characters, so the text is storable whatever it holds.
                "message": orjson.dumps(row, default=str).decode(),
                "created_at": utcnow(),
            }
        )
    async with sessions() as session:
        await insert_skipping_duplicates(session, SetAsideMessage, records)
        await session.commit()
