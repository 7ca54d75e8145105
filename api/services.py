"""What the REST API does beyond a single repository call: rules, checks and transactions."""

from __future__ import annotations

import asyncio
import secrets
from typing import Any

from fastapi import HTTPException, status
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm.exc import StaleDataError

from api import schemas
from api.security import HashingPool, hash_password, verify_password
from persistence.database import SessionFactory
from persistence.models import Item, Role, Room, User, next_token_version, utcnow
from persistence.repositories import ItemRepository, RoomRepository, UserRepository


def _not_found(what: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"{what} not found")


def _may_manage(actor: User, owner_id: int) -> bool:
    return actor.id == owner_id or actor.role == Role.ADMIN


async def register(
    session: AsyncSession,
    body: schemas.UserCreate,
    hashing: HashingPool | None,
    role: Role = Role.USER,
) -> User:
    users = UserRepository(session)
    if await users.by_username(body.username) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, "Username already taken")
    user = User(
        username=body.username,
        password_hash=await hash_password(body.password, hashing),
        display_name=body.display_name or body.username,
        role=role.value,
        is_guest=False,
    )
    try:
        await users.add(user)
        await session.commit()
    except IntegrityError:  # a concurrent registration of the same name won the race
        await session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, "Username already taken") from None
    return user


def _guest(name: str) -> User:
    return User(
        username=f"guest-{secrets.token_hex(6)}",
        password_hash=None,
        display_name=name,
        role=Role.USER.value,
        is_guest=True,
    )


async def create_guest(session: AsyncSession, name: str) -> User:
    user = _guest(name)
    await UserRepository(session).add(user)
    await session.commit()
    return user


class GuestBatcher:
    """Guest rows written many to a transaction: a crowd at the door costs one write turn per
    batch, not one per guest.

    A database takes one write transaction at a time (SQLite), or pays a commit per
    transaction (every database), and under a crowd each turn also waits for a busy event
    loop; so the door admits about as many guests a second as it gets write turns. Here the
    guests that arrive while one batch is being written form the next one, written in one
    transaction (one INSERT ... RETURNING): nothing waits for a batch to fill, and a lone
    guest is written at once. A batch that fails fails every guest in it with the same error
    (a busy database: 503 with Retry-After, by the app's handler).
    """

    def __init__(self, sessions: SessionFactory, max_batch: int = 200) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, not {max_batch!r}")
        self.sessions = sessions
        self.max_batch = max_batch
        self._waiting: list[tuple[User, asyncio.Future[User]]] = []
        self._writer: asyncio.Task[None] | None = None
        self.batches = 0

    async def create(self, name: str) -> User:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[User] = loop.create_future()
        self._waiting.append((_guest(name), done))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_all())
        return await done

    async def _write_all(self) -> None:
        while self._waiting:
            batch = self._waiting[: self.max_batch]
            del self._waiting[: self.max_batch]
            try:
                async with self.sessions() as session:
                    session.add_all([user for user, _ in batch])
                    await session.commit()
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
                continue
            self.batches += 1
            for user, done in batch:
                if not done.done():  # its request may have gone meanwhile
                    done.set_result(user)


async def get_user(session: AsyncSession, user_id: int) -> User:
    user = await UserRepository(session).get(user_id)
    if user is None:
        raise _not_found("User")
    return user


async def update_user(
    session: AsyncSession,
    actor: User,
    user_id: int,
    body: schemas.UserUpdate,
    hashing: HashingPool | None,
) -> User:
    user = await get_user(session, user_id)
    if not _may_manage(actor, user.id):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "You may only change your own account")
    if body.role is not None and actor.role != Role.ADMIN:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Only admins may change roles")
    if body.password is not None and actor.id == user.id:
        # A stolen token alone must not be enough to take the account over for good.
        if body.current_password is None:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                "Changing your password needs current_password",
            )
        if not await verify_password(body.current_password, user.password_hash, hashing):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "current_password is not correct")
    role_changed = body.role is not None and body.role != user.role
    if body.display_name is not None:
        user.display_name = body.display_name
    if body.password is not None:
        user.password_hash = await hash_password(body.password, hashing)
    if body.role is not None:
        user.role = body.role
    if body.password is not None or role_changed:
        # Tokens carry the role and stand for the password they were issued under: end them.
        user.token_version = next_token_version(user.token_version)
    await session.commit()
    return user


async def delete_user(session: AsyncSession, actor: User, user_id: int) -> None:
    user = await get_user(session, user_id)
    if not _may_manage(actor, user.id):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "You may only delete your own account")
    await UserRepository(session).delete(user)
    await session.commit()


async def create_item(session: AsyncSession, owner: User, body: schemas.ItemCreate) -> Item:
    now = utcnow()
    item = Item(owner_id=owner.id, title=body.title, data=body.data, created_at=now, updated_at=now)
    await ItemRepository(session).add(item)
    await session.commit()
    return item


async def get_item(session: AsyncSession, item_id: int) -> Item:
    item = await ItemRepository(session).get(item_id)
    if item is None:
        raise _not_found("Item")
    return item


def _stale(current: int) -> HTTPException:
    return HTTPException(
        status.HTTP_409_CONFLICT,
        f"Item was changed by someone else (now at version {current}); reload and retry",
    )


async def update_item(
    session: AsyncSession, actor: User, item_id: int, body: schemas.ItemUpdate
) -> Item:
    item = await get_item(session, item_id)
    if not _may_manage(actor, item.owner_id):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Only the owner may change this item")
    if item.version != body.version:
        raise _stale(item.version)
    changes: dict[str, Any] = body.model_dump(exclude_unset=True, exclude={"version"})
    if changes.get("title") is not None:
        item.title = changes["title"]
    if changes.get("data") is not None:
        item.data = changes["data"]
    item.updated_at = utcnow()
    try:
        await session.commit()  # the mapper's version check guards the race between read and write
    except StaleDataError:
        await session.rollback()
        fresh = await get_item(session, item_id)
        raise _stale(fresh.version) from None
    return item


async def delete_item(
    session: AsyncSession, actor: User, item_id: int, version: int | None
) -> Item:
    item = await get_item(session, item_id)
    if not _may_manage(actor, item.owner_id):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Only the owner may delete this item")
    if version is not None and item.version != version:
        raise _stale(item.version)
    try:
        await ItemRepository(session).delete(item)
        await session.commit()
    except StaleDataError:
        await session.rollback()
        raise _stale(item.version) from None
    return item


async def create_room(session: AsyncSession, creator: User, body: schemas.RoomCreate) -> Room:
    rooms = RoomRepository(session)
    if await rooms.by_name(body.name) is not None:
        raise HTTPException(status.HTTP_409_CONFLICT, "A room with this name exists")
    members = set(body.members)
    if body.private:
        missing = members - await UserRepository(session).existing_ids(members)
        if missing:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"Unknown member ids: {sorted(missing)[:20]}",
            )
        members.add(creator.id)
    elif members:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "Only private rooms have a member list"
        )
    room = Room(name=body.name, private=body.private, created_by=creator.id, created_at=utcnow())
    try:
        await rooms.add(room, members)
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise HTTPException(status.HTTP_409_CONFLICT, "A room with this name exists") from None
    return room


async def visible_room(session: AsyncSession, user: User, name: str) -> Room | None:
    """The room's row if the user may see it; None for a public room never created by REST.

    A private room is reported as missing to non-members, so its name leaks nothing.
    """
    rooms = RoomRepository(session)
    room = await rooms.by_name(name)
    if room is None:
        return None
    if room.private and user.role != Role.ADMIN and not await rooms.is_member(room, user.id):
        raise _not_found("Room")
    return room
