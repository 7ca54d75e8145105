from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api import schemas, services
from api.deps import Context, CurrentUser, SessionDep
from persistence.models import User
from persistence.repositories import UserRepository

log = logging.getLogger("collab.api")
router = APIRouter(prefix="/users", tags=["users"])
UserId = Annotated[int, Path(ge=1, le=2**31 - 1)]
Limit = Annotated[int, Query(ge=1, le=200)]
Offset = Annotated[int, Query(ge=0, le=10**9)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.UserOut)
async def create_user(body: schemas.UserCreate, session: SessionDep) -> User:
    return await services.register(session, body)


@router.get("", response_model=schemas.Page[schemas.UserOut])
async def list_users(
    session: SessionDep, _user: CurrentUser, limit: Limit = 50, offset: Offset = 0
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
    user_id: UserId, body: schemas.UserUpdate, session: SessionDep, user: CurrentUser
) -> User:
    return await services.update_user(session, user, user_id, body)


@router.delete("/{user_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_user(
    user_id: UserId, session: SessionDep, user: CurrentUser, context: Context
) -> Response:
    await services.delete_user(session, user, user_id)
    # Tokens issued before stay valid until they expire; sockets opened with them must not.
    if context.realtime is not None:
        from realtime.broker import BrokerUnavailable

        try:
            await context.realtime.disconnect_user(str(user_id))
        except BrokerUnavailable:
            log.warning(
                "user %s deleted; other nodes could not be told to close its sockets", user_id
            )
    return Response(status_code=status.HTTP_204_NO_CONTENT)
