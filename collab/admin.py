"""Operator commands that need no running server: accounts for services and admins.

A service that publishes to feeds, or an admin, cannot register itself through the API (the
API only makes ordinary users), so the operator creates them here, on the database directly.
"""

from __future__ import annotations

import asyncio

from pydantic import TypeAdapter, ValidationError

from api import schemas
from api.security import hash_password
from collab.settings import Settings
from persistence.database import create_engine, create_session_factory
from persistence.models import Role, User
from persistence.repositories import UserRepository


class AdminError(Exception):
    """A refusal with a message for the operator."""


async def create_user(settings: Settings, username: str, password: str, role: str) -> int:
    try:
        TypeAdapter(schemas.Username).validate_python(username)
        TypeAdapter(schemas.Password).validate_python(password)
        Role(role)
    except (ValidationError, ValueError) as exc:
        raise AdminError(f"invalid user: {exc}") from None
    engine = create_engine(settings.database_url)
    try:
        async with create_session_factory(engine)() as session:
            users = UserRepository(session)
            if await users.by_username(username) is not None:
                raise AdminError(f"user {username!r} exists")
            user = User(
                username=username,
                password_hash=await hash_password(password),
                display_name=username,
                role=role,
                is_guest=False,
            )
            await users.add(user)
            await session.commit()
            return user.id
    finally:
        await engine.dispose()


def create_user_sync(settings: Settings, username: str, password: str, role: str) -> int:
    return asyncio.run(create_user(settings, username, password, role))
