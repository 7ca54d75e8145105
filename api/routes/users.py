"""Accounts. Who may do what (SECURITY.md says the same):

- `POST /users` and `GET /users` (the whole list, with roles) are for admins; anyone else
  makes an account through `POST /auth/register`, the one rate-limited way in.
- `GET /users/me` and `GET /users/{id}` for any signed-in user (a member list needs names).
- `PATCH` and `DELETE` for the account itself or an admin.
"""

from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api import schemas, services
from api.deps import AdminUser, ApiContext, Context, CurrentUser, SessionDep
from persistence.models import Role, User
from persistence.repositories import UserRepository

log = logging.getLogger("collab.api")
router = APIRouter(prefix="/users", tags=["users"])
UserId = Annotated[int, Path(ge=1, le=2**31 - 1)]
Limit = Annotated[int, Query(ge=1, le=200)]
Offset = Annotated[int, Query(ge=0, le=10**9)]


class AdminUserCreate(schemas.UserCreate):
    role: Role = Role.USER


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.UserOut)
async def create_user(
    body: AdminUserCreate, context: Context, session: SessionDep, _admin: AdminUser
) -> User:
    """Admins only: an account of any role. Everyone else uses `POST /auth/register`."""
    user_fields = body.model_dump(exclude={"role"})
    return await services.register(
        session, schemas.UserCreate(**user_fields), context.hashing, body.role
    )


@router.get("", response_model=schemas.Page[schemas.UserOut])
async def list_users(
    session: SessionDep, _admin: AdminUser, limit: Limit = 50, offset: Offset = 0
) -> schemas.Page[schemas.UserOut]:
    users, total = await UserRepository(session).page(limit, offset)
    return schemas.Page(items=[schemas.UserOut.model_validate(u) for u in users], total=total)


@router.get("/me", response_model=schemas.UserOut)
async def read_me(user: CurrentUser) -> User:
    return user


@router.get("/{user_id}", response_model=schemas.UserOut)
async def read_user(user_id: UserId, session: SessionDep, _user: CurrentUser) -> User:
    return await services.get_user(session, user_id)


@router.patch("/{user_id}", response_model=schemas.UserOut)
async def update_user(
    user_id: UserId,
    body: schemas.UserUpdate,
    context: Context,
    session: SessionDep,
    user: CurrentUser,
) -> User:
    target = await services.get_user(session, user_id)
    version = target.token_version
    updated = await services.update_user(session, user, user_id, body, context.hashing)
    if updated.token_version != version:
        # A password or role change ended the account's tokens: end its sockets too.
        await _close_sockets(context, user_id, "password or role changed")
    return updated


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(
    user_id: UserId, session: SessionDep, user: CurrentUser, context: Context
) -> Response:
    await services.delete_user(session, user, user_id)
    await _close_sockets(context, user_id, "deleted")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


async def _close_sockets(context: ApiContext, user_id: int, why: str) -> None:
    """Close the account's sockets on every node (4401): they were opened with credentials
    that no longer hold."""
    if context.accounts is not None:  # other nodes forget it on the node's control message
        context.accounts.forget(user_id)
    if context.realtime is None:
        return
    from realtime.broker import BrokerUnavailable

    try:
        await context.realtime.disconnect_user(str(user_id))
    except BrokerUnavailable:
        log.warning("user %s %s; other nodes could not be told to close its sockets", user_id, why)
