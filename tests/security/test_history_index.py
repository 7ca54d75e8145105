"""REST history without an epoch reads the room's newest messages (issue 15, Low): an index
serves it, instead of sorting every message of the room."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import select
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url

from persistence.models import Message

pytestmark = pytest.mark.postgres


async def test_the_newest_epoch_of_a_room_is_read_through_an_index(postgres_database: str) -> None:
    query = (
        select(Message.epoch)
        .where(Message.room == "general")
        .order_by(Message.created_at.desc(), Message.id.desc())
        .limit(1)
    )
    dialect = postgresql.dialect()  # type: ignore[no-untyped-call]  # SQLAlchemy's is untyped
    sql = str(query.compile(dialect=dialect, compile_kwargs={"literal_binds": True}))
    dsn = make_url(postgres_database).set(drivername="postgresql")
    connection = await asyncpg.connect(dsn.render_as_string(hide_password=False))
    try:
        await connection.execute("SET enable_seqscan = off")  # an empty table: no cheaper way
        plan = "\n".join(r[0] for r in await connection.fetch("EXPLAIN " + sql))
    finally:
        await connection.close()
    assert "ix_messages_room_created_at_id" in plan, plan
    assert "Sort" not in plan, plan
