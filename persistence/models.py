"""The tables. Names follow a fixed convention so Alembic migrations are stable across backends."""

from __future__ import annotations

import enum
import secrets
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.dialects import mysql
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator, TypeEngine

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments an INTEGER PRIMARY KEY; BIGINT elsewhere.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on the way out, whatever the backend: SQLite keeps no zone."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        # MySQL's DATETIME keeps whole seconds unless asked for microseconds; a message's
        # stored `ts` must read back exactly as it was sent.
        if dialect.name in ("mysql", "mariadb"):
            return dialect.type_descriptor(mysql.DATETIME(fsp=6))
        return dialect.type_descriptor(DateTime(timezone=True))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class Role(enum.StrEnum):
    USER = "user"
    SERVICE = "service"
    ADMIN = "admin"


def new_token_version() -> int:
    """A random start rather than 0: should an id ever be handed out twice (a restored backup,
    a reset sequence), the new account still refuses the old account's tokens."""
    return secrets.randbelow(2**31 - 2) + 1


def next_token_version(current: int) -> int:
    return current % (2**31 - 1) + 1


class User(Base):
    __tablename__ = "users"
    # AUTOINCREMENT: SQLite otherwise hands a deleted user's id to the next new user.
    __table_args__ = {"sqlite_autoincrement": True}

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(255))
    display_name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16), default=Role.USER.value)
    is_guest: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Carried in every token and compared on every request and WebSocket connect; bumped when
    # the password or role changes, which ends every token issued before.
    token_version: Mapped[int] = mapped_column(
        Integer, default=new_token_version, server_default=text("0")
    )


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    title: Mapped[str] = mapped_column(String(200))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    version: Mapped[int] = mapped_column(Integer, default=1)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)

    # The ORM bumps `version` and checks the old value in the UPDATE's WHERE clause, so two
    # writers based on the same version cannot both win.
    __mapper_args__ = {"version_id_col": version}


class RoomMember(Base):
    __tablename__ = "room_members"

    room_id: Mapped[int] = mapped_column(
        ForeignKey("rooms.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[int] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class Room(Base):
    __tablename__ = "rooms"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    members: Mapped[list[RoomMember]] = relationship(cascade="all, delete-orphan", lazy="selectin")


class Message(Base):
    """One accepted chat message. `msg_id` is the idempotency key for exactly-once writes."""

    __tablename__ = "messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(32), unique=True)
    room: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[str] = mapped_column(String(32))
    offset: Mapped[int] = mapped_column(BigInteger)
    user_id: Mapped[str] = mapped_column(String(64))
    user_name: Mapped[str] = mapped_column(String(128))
    body: Mapped[dict[str, Any]] = mapped_column()
    client_msg_id: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column()

    __table_args__ = (
        UniqueConstraint("room", "epoch", "offset", name="uq_messages_room_epoch_offset"),
        Index("ix_messages_room_offset", "room", "offset"),
        # REST history without an epoch reads the room's newest messages first.
        Index("ix_messages_room_created_at_id", "room", "created_at", "id"),
    )


class SetAsideMessage(Base):
    """A message the database refused (a bad row, not an outage), kept out of `messages`.

    Acknowledged messages are never dropped silently: a row the database will not take is
    recorded here with the database's reason and the message as JSON text (text, because
    the refused value may be one that no typed column of this database can hold), so that
    an operator can see it, and the storage check counts its offset as accounted for.
    """

    __tablename__ = "set_aside_messages"

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(32), unique=True)
    room: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[str] = mapped_column(String(32))
    offset: Mapped[int] = mapped_column(BigInteger)
    reason: Mapped[str] = mapped_column(String(500))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (Index("ix_set_aside_messages_room_epoch_offset", "room", "epoch", "offset"),)
