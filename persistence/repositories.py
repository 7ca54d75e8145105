"""Queries, one class per aggregate. Each takes a session; the caller owns the transaction."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Select, delete, func, select, text
from sqlalchemy.dialects import mysql, postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from persistence.models import Item, Message, Room, RoomMember, SetAsideMessage, User

T = TypeVar("T")


async def _page(
    session: AsyncSession, query: Select[T], limit: int, offset: int
) -> tuple[list[T], int]:
    total = await session.scalar(select(func.count()).select_from(query.order_by(None).subquery()))
    rows = (await session.scalars(query.limit(limit).offset(offset))).all()
    return list(rows), int(total or 0)


class UserRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, user_id: int) -> User | None:
        return await self.session.get(User, user_id)

    async def by_username(self, username: str) -> User | None:
        return await self.session.scalar(select(User).where(User.username == username))

    async def existing_ids(self, user_ids: Iterable[int]) -> set[int]:
        ids = set(user_ids)
        if not ids:
            return set()
        return set((await self.session.scalars(select(User.id).where(User.id.in_(ids)))).all())

    async def add(self, user: User) -> User:
        self.session.add(user)
        await self.session.flush()
        return user

    async def page(self, limit: int, offset: int) -> tuple[list[User], int]:
        return await _page(self.session, select(User).order_by(User.id), limit, offset)

    async def delete(self, user: User) -> None:
        await self.session.delete(user)
        await self.session.flush()


class ItemRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def get(self, item_id: int) -> Item | None:
        return await self.session.get(Item, item_id)

    async def add(self, item: Item) -> Item:
        self.session.add(item)
        await self.session.flush()
        return item

    async def page(
        self, limit: int, offset: int, owner_id: int | None = None
    ) -> tuple[list[Item], int]:
        query = select(Item).order_by(Item.id)
        if owner_id is not None:
            query = query.where(Item.owner_id == owner_id)
        return await _page(self.session, query, limit, offset)

    async def all(self, limit: int) -> list[Item]:
        return list((await self.session.scalars(select(Item).order_by(Item.id).limit(limit))).all())

    async def newest(self, limit: int) -> list[Item]:
        """The `limit` most recently created items, newest first."""
        query = select(Item).order_by(Item.id.desc()).limit(limit)
        return list((await self.session.scalars(query)).all())

    async def delete(self, item: Item) -> None:
        await self.session.delete(item)
        await self.session.flush()


class RoomRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def by_name(self, name: str) -> Room | None:
        return await self.session.scalar(select(Room).where(Room.name == name))

    async def add(self, room: Room, member_ids: Iterable[int]) -> Room:
        room.members = [RoomMember(user_id=user_id) for user_id in sorted(set(member_ids))]
        self.session.add(room)
        await self.session.flush()
        return room

    async def visible_page(self, user_id: int, limit: int, offset: int) -> tuple[list[Room], int]:
        """Public rooms and the private rooms this user belongs to."""
        member_of = select(RoomMember.room_id).where(RoomMember.user_id == user_id)
        query = (
            select(Room)
            .where((Room.private.is_(False)) | (Room.id.in_(member_of)))
            .order_by(Room.name)
        )
        return await _page(self.session, query, limit, offset)

    async def is_member(self, room: Room, user_id: int) -> bool:
        found = await self.session.scalar(
            select(RoomMember.user_id).where(
                RoomMember.room_id == room.id, RoomMember.user_id == user_id
            )
        )
        return found is not None


class MessageRepository:
    def __init__(self, session: AsyncSession) -> None:
        self.session = session

    async def insert_many(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert messages, skipping any whose `msg_id` is already stored.

        A batch delivered twice (a worker killed after its commit but before its ack) then
        writes nothing the second time. Returns how many rows were new.
        """
        return await insert_skipping_duplicates(self.session, Message, rows)

    async def latest_epoch(self, room: str) -> str | None:
        return await self.session.scalar(
            select(Message.epoch)
            .where(Message.room == room)
            .order_by(Message.created_at.desc(), Message.id.desc())
            .limit(1)
        )

    async def last_position(self, room: str) -> tuple[str, int] | None:
        """The (epoch, offset) of the newest stored message of a room."""
        epoch = await self.latest_epoch(room)
        if epoch is None:
            return None
        offset = await self.session.scalar(
            select(func.max(Message.offset)).where(Message.room == room, Message.epoch == epoch)
        )
        return epoch, int(offset or 0)

    async def page(
        self,
        room: str,
        epoch: str,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> tuple[list[Message], bool]:
        """Messages of one epoch, oldest first, and whether more lie beyond the page.

        With `after`, the page starts just after that offset (reading forward, as recovery
        does); otherwise it ends just before `before` (or at the newest message).
        """
        query = select(Message).where(Message.room == room, Message.epoch == epoch)
        if before is not None:
            query = query.where(Message.offset < before)
        if after is not None:
            query = query.where(Message.offset > after)
        forward = after is not None
        order = Message.offset.asc() if forward else Message.offset.desc()
        rows = list((await self.session.scalars(query.order_by(order).limit(limit + 1))).all())
        has_more = len(rows) > limit
        rows = rows[:limit]
        if not forward:
            rows.reverse()
        return rows, has_more

    async def count(self, room: str | None = None) -> int:
        query = select(func.count()).select_from(Message)
        if room is not None:
            query = query.where(Message.room == room)
        return int(await self.session.scalar(query) or 0)

    async def delete_room(self, room: str) -> None:
        await self.session.execute(delete(Message).where(Message.room == room))


async def insert_skipping_duplicates(
    session: AsyncSession, model: type[Message | SetAsideMessage], rows: Sequence[dict[str, Any]]
) -> int:
    """Insert rows, skipping those whose `msg_id` is taken; how many were new."""
    if not rows:
        return 0
    dialect = session.get_bind().dialect.name
    if dialect in ("postgresql", "sqlite"):
        # RETURNING names the rows actually written (a batched executemany reports no useful
        # rowcount), so duplicates can be counted.
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        stmt = insert(model).on_conflict_do_nothing(index_elements=["msg_id"]).returning(model.id)
        written = await session.execute(stmt, list(rows))
        return len(written.all())
    if dialect in ("mysql", "mariadb"):
        # One multi-row statement: its rowcount is the rows written (an executemany's is not
        # reported).
        result = await session.execute(mysql.insert(model).values(list(rows)).prefix_with("IGNORE"))
        new = int(getattr(result, "rowcount", 0) or 0)
        await _refuse_what_ignore_hid(session, model, rows, new)
        return new
    raise NotImplementedError(f"no idempotent insert for {dialect}")  # pragma: no cover


async def _refuse_what_ignore_hid(
    session: AsyncSession,
    model: type[Message | SetAsideMessage],
    rows: Sequence[dict[str, Any]],
    written: int,
) -> None:
    """MySQL's IGNORE skips a taken `msg_id`, and also turns every other refusal into a
    warning: a row taking another message's (room, epoch, offset) is dropped, a value too long
    for its column is cut short, both silently. What the other databases refuse is refused
    here too (raised, the transaction uncommitted), so the writer sets that row aside.

    Each skipped row leaves one warning; so more warnings than skipped rows means a written
    row was altered, and a `msg_id` of the batch missing from the table means a row was skipped
    for something else than its id. (The warnings are read first: a statement that reads a
    table clears them. `@@warning_count` counts past the 64 that SHOW WARNINGS keeps.)
    """
    warnings = int(await session.scalar(text("SELECT @@warning_count")) or 0)
    shown = (await session.execute(text("SHOW WARNINGS"))).all() if warnings else []
    ids = {row["msg_id"] for row in rows}
    present = await session.scalar(
        select(func.count()).select_from(model).where(model.msg_id.in_(ids))
    )
    if warnings == len(rows) - written and present == len(ids):
        return
    # The database's own words, less the taken ids that IGNORE is there to skip.
    reasons = [
        f"{level} {code}: {message}"
        for level, code, message in shown
        if not (code == _DUPLICATE_KEY and "msg_id'" in message)
    ]
    reason = "; ".join(reasons[:3]) or "a row was refused"
    raise IntegrityError("INSERT IGNORE", None, _Refused(reason))


_DUPLICATE_KEY = 1062  # ER_DUP_ENTRY


class _Refused(Exception):
    """The database's warnings about a row it would have refused without IGNORE."""


def message_row(
    *,
    msg_id: str,
    room: str,
    epoch: str,
    offset: int,
    user_id: str,
    user_name: str,
    body: dict[str, Any],
    client_msg_id: str | None,
    created_at: datetime,
) -> dict[str, Any]:
    return {
        "msg_id": msg_id,
        "room": room,
        "epoch": epoch,
        "offset": offset,
        "user_id": user_id,
        "user_name": user_name,
        "body": body,
        "client_msg_id": client_msg_id,
        "created_at": created_at,
    }
