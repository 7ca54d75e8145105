"""The storage side of the realtime core: `realtime.storage` interfaces over the database."""

from __future__ import annotations

from collections import OrderedDict
from datetime import UTC, datetime

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from persistence.database import SessionFactory
from persistence.models import Message, Room, RoomMember, utcnow
from persistence.repositories import MessageRepository, UserRepository
from realtime.storage import HistoryReader, RoomAccess, StoredMessage
from realtime.types import UserInfo


def format_ts(moment: datetime) -> str:
    """ISO 8601 in UTC with milliseconds and a Z, as the wire protocol writes `ts`."""
    if moment.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        moment = moment.replace(tzinfo=UTC)
    return (
        moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"
    )


def parse_ts(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def to_stored(row: Message) -> StoredMessage:
    return StoredMessage(
        msg_id=row.msg_id,
        room=row.room,
        epoch=row.epoch,
        offset=row.offset,
        user=UserInfo(id=row.user_id, name=row.user_name),
        body=row.body,
        client_msg_id=row.client_msg_id,
        ts=format_ts(row.created_at),
    )


def to_row(message: StoredMessage) -> dict[str, object]:
    return {
        "msg_id": message.msg_id,
        "room": message.room,
        "epoch": message.epoch,
        "offset": message.offset,
        "user_id": message.user.id,
        "user_name": message.user.name,
        "body": message.body,
        "client_msg_id": message.client_msg_id,
        "created_at": parse_ts(message.ts),
    }


class DatabaseHistory(HistoryReader):
    def __init__(self, sessions: SessionFactory) -> None:
        self.sessions = sessions

    async def page(
        self,
        room: str,
        epoch: str | None,
        *,
        before: int | None = None,
        after: int | None = None,
        limit: int = 50,
    ) -> tuple[list[StoredMessage], bool]:
        async with self.sessions() as session:
            repo = MessageRepository(session)
            if epoch is None:
                epoch = await repo.latest_epoch(room)
                if epoch is None:
                    return [], False
            rows, has_more = await repo.page(room, epoch, before=before, after=after, limit=limit)
            return [to_stored(row) for row in rows], has_more

    async def last_position(self, room: str) -> tuple[str, int] | None:
        async with self.sessions() as session:
            return await MessageRepository(session).last_position(room)


class DatabaseRoomAccess(RoomAccess):
    """Private rooms admit their members; any other valid name is a public room, recorded on
    first use so REST listings show it.

    A public room stays public (its name is taken, so no private room can be created under
    it), so that verdict is remembered: a join storm into one room costs one query, not one
    per connection.
    """

    MAX_REMEMBERED = 10_000

    def __init__(self, sessions: SessionFactory) -> None:
        self.sessions = sessions
        self._public: OrderedDict[str, None] = OrderedDict()

    def _remember_public(self, room: str) -> bool:
        self._public[room] = None
        self._public.move_to_end(room)
        while len(self._public) > self.MAX_REMEMBERED:
            self._public.popitem(last=False)
        return True

    async def can_access(self, room: str, user: UserInfo) -> bool:
        return await self._allowed(room, user, record=True)

    async def can_read(self, room: str, user: UserInfo) -> bool:
        return await self._allowed(room, user, record=False)

    async def _allowed(self, room: str, user: UserInfo, *, record: bool) -> bool:
        if room in self._public:
            return True
        async with self.sessions() as session:
            found = (
                await session.execute(select(Room.id, Room.private).where(Room.name == room))
            ).first()
            if found is None and not record:
                # Unknown: public to read (there is nothing in it), but neither recorded nor
                # remembered, so a private room of that name can still be created.
                return True
            if found is None:
                session.add(Room(name=room, private=False, created_at=utcnow()))
                try:
                    await session.commit()
                except IntegrityError:  # created concurrently: public or private, look again
                    await session.rollback()
                    found = (
                        await session.execute(
                            select(Room.id, Room.private).where(Room.name == room)
                        )
                    ).first()
                    if found is None:
                        return True
                else:
                    return self._remember_public(room)
            room_id, private = found
            if not private:
                return self._remember_public(room)
            if not user.id.isdigit():
                return False
            db_user = await UserRepository(session).get(int(user.id))
            if db_user is not None and db_user.role == "admin":
                return True
            member = await session.scalar(
                select(RoomMember.user_id).where(
                    RoomMember.room_id == room_id, RoomMember.user_id == int(user.id)
                )
            )
            return member is not None
