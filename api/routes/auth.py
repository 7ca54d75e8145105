from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.security import OAuth2PasswordRequestForm

from api import schemas, services
from api.deps import AuthRateLimit, Context, SessionDep
from api.security import create_access_token, verify_password
from persistence.models import User
from persistence.repositories import UserRepository

router = APIRouter(
    prefix="/auth",
    tags=["auth"],
    dependencies=[AuthRateLimit],
    responses={429: {"description": "Too many requests from this address"}},
)


def issue_token(context: Context, user: User) -> str:
    return create_access_token(
        context.config.secret_key,
        user_id=user.id,
        name=user.display_name,
        role=user.role,
        minutes=context.config.access_token_minutes,
    )


@router.post("/register", status_code=status.HTTP_201_CREATED, response_model=schemas.UserOut)
async def register(body: schemas.UserCreate, session: SessionDep) -> User:
    return await services.register(session, body)


@router.post("/token", response_model=schemas.Token)
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], context: Context, session: SessionDep
) -> schemas.Token:
    """OAuth2 password flow: a form with `username` and `password`."""
    user = None
    if len(form.username) <= 64 and len(form.password) <= 128:
        user = await UserRepository(session).by_username(form.username)
    hashed = user.password_hash if user is not None else None
    if user is None or not await verify_password(form.password[:128], hashed):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Incorrect username or password",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return schemas.Token(access_token=issue_token(context, user))


@router.post("/guest", response_model=schemas.GuestToken)
async def guest(
    body: schemas.GuestCreate, context: Context, session: SessionDep
) -> schemas.GuestToken:
    """A token for a throwaway user with a display name; off when `COLLAB_GUEST_ACCESS=false`."""
    if not context.config.guest_access:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Guest access is switched off")
    user = await services.create_guest(session, body.name)
    return schemas.GuestToken(
        access_token=issue_token(context, user), user=schemas.UserOut.model_validate(user)
    )
