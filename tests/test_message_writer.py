"""The one write path of every message (`persistence.writer`), on SQLite, PostgreSQL and MariaDB.

What it promises on each database alike: a message already stored is skipped, and a row the
database refuses is set aside with the database's reason while the rows around it are
stored. MySQL's `INSERT IGNORE`, which skips a taken `msg_id`, would also turn every other
refusal into a warning: a message taking another's position would vanish, and a value too long
for its column would be stored cut short.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from persistence.database import SessionFactory, create_engine, create_session_factory
from persistence.models import Message, SetAsideMessage, utcnow
from persistence.repositories import message_row
from persistence.writer import write_messages
from realtime.types import new_msg_id


@pytest.fixture
async def sessions(database_url: str) -> AsyncIterator[SessionFactory]:
    engine = create_engine(database_url)
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


def row(room: str, offset: int, user_name: str = "ann") -> dict[str, object]:
    return message_row(
        msg_id=new_msg_id(),
        room=room,
        epoch="ep",
        offset=offset,
        user_id="7",
        user_name=user_name,
        body={"n": offset, "text": "é ☃"},
        client_msg_id=None,
        created_at=utcnow(),
    )


async def stored(sessions: SessionFactory, room: str) -> list[tuple[int, str, str]]:
    async with sessions() as session:
        found = await session.execute(
            select(Message.offset, Message.msg_id, Message.user_name)
            .where(Message.room == room)
            .order_by(Message.offset)
        )
        return [(r.offset, r.msg_id, r.user_name) for r in found]


async def set_aside(sessions: SessionFactory, room: str) -> dict[str, str]:
    async with sessions() as session:
        found = await session.execute(
            select(SetAsideMessage.msg_id, SetAsideMessage.reason).where(
                SetAsideMessage.room == room
            )
        )
        return {r.msg_id: r.reason for r in found}


async def test_a_refused_row_is_set_aside_and_the_rest_stored_once(
    sessions: SessionFactory, database_url: str
) -> None:
    room = f"w-{uuid.uuid4().hex[:8]}"
    first = row(room, 5)
    assert (await write_messages(sessions, [first])).written == 1
    batch = [row(room, n) for n in (1, 2, 3, 4)]
    taken = row(room, 5)  # offset 5 again, under another msg_id: a position already taken
    batch.insert(2, taken)
    refused = {str(taken["msg_id"])}
    too_long: dict[str, object] | None = None
    if not database_url.startswith("sqlite"):  # SQLite does not enforce a VARCHAR's length
        too_long = row(room, 6, user_name="n" * 129)  # user_name is 128 characters at most
        batch.append(too_long)
        refused.add(str(too_long["msg_id"]))

    outcome = await write_messages(sessions, batch)

    assert outcome.written == 4
    assert {str(r["msg_id"]) for r, _ in outcome.set_aside} == refused
    assert await stored(sessions, room) == [
        *((r["offset"], r["msg_id"], "ann") for r in batch if r["offset"] in (1, 2, 3, 4)),
        (5, first["msg_id"], "ann"),
    ]
    # Each set aside with the database's own reason, for the operator who looks.
    reasons = await set_aside(sessions, room)
    assert set(reasons) == refused, reasons
    assert "offset" in reasons[str(taken["msg_id"])].lower(), reasons  # the position's key
    if too_long is not None:
        reason = reasons[str(too_long["msg_id"])]
        assert "user_name" in reason or "128" in reason, reason  # the column, or its length

    # The same batch again (a redelivery): nothing written twice, nothing set aside twice.
    again = await write_messages(sessions, [r for r in batch if str(r["msg_id"]) not in refused])
    assert again.written == 0 and again.set_aside == []
    assert len(await stored(sessions, room)) == 5
