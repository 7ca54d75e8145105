from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.security import OAuth2PasswordRequestForm

from api import schemas, services
from api.accounts import Account
from api.deps import AuthRateLimit, Context, CurrentUser, SessionDep, oauth2_scheme
from api.ratelimit import LoginFailureLimiter
from api.security import create_access_token, decode_access_token, verify_password
from persistence.models import User
from persistence.repositories import UserRepository

router = APIRouter(
    prefix="/auth",
    tags=["auth"],
    dependencies=[AuthRateLimit],
    responses={
        429: {"description": "Too many requests from this address, or sign-ins for this account"},
        503: {"description": "Too many password checks at once, or a backend is down; retry"},
    },
)


def issue_token(context: Context, user: User) -> str:
    return create_access_token(
        context.config.secret_key,
        user_id=user.id,
        name=user.display_name,
        role=user.role,
        version=user.token_version,
        minutes=context.config.access_token_minutes,
    )


def _login_limiter(context: Context) -> LoginFailureLimiter:
    if context.login_limiter is None:
        context.login_limiter = LoginFailureLimiter(context.config.login_failure_limit, "memory://")
    return context.login_limiter


@router.post("/register", status_code=status.HTTP_201_CREATED, response_model=schemas.UserOut)
async def register(body: schemas.UserCreate, context: Context, session: SessionDep) -> User:
    """The one way to make an account without an admin; limited per client address."""
    return await services.register(session, body, context.hashing)


@router.post("/token", response_model=schemas.Token)
async def token(
    form: Annotated[OAuth2PasswordRequestForm, Depends()], context: Context, session: SessionDep
) -> schemas.Token:
    """OAuth2 password flow: a form with `username` and `password`."""
    limiter = _login_limiter(context)
    await limiter.attempt(form.username)
    user = None
    if len(form.username) <= 64 and len(form.password) <= 128:
        user = await UserRepository(session).by_username(form.username)
    hashed = user.password_hash if user is not None else None
    if user is None or not await verify_password(form.password[:128], hashed, context.hashing):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "Incorrect username or password",
            headers={"WWW-Authenticate": "Bearer"},
        )
    await limiter.succeeded(form.username)
    return schemas.Token(access_token=issue_token(context, user))


@router.post("/guest", response_model=schemas.GuestToken)
async def guest(
    body: schemas.GuestCreate, context: Context, session: SessionDep
) -> schemas.GuestToken:
    """A token for a throwaway user with a display name; off when `COLLAB_GUEST_ACCESS=false`."""
    if not context.config.guest_access:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "Guest access is switched off")
    if context.guests is not None:
        user = await context.guests.create(body.name)
    else:
        user = await services.create_guest(session, body.name)
    if context.accounts is not None:
        # Its WebSocket connect follows at once: it need not read back the row just written.
        context.accounts.remember(
            Account(user.id, user.token_version, user.display_name, user.role)
        )
    return schemas.GuestToken(
        access_token=issue_token(context, user), user=schemas.UserOut.model_validate(user)
    )


@router.post("/ws-ticket", response_model=schemas.WsTicket)
async def ws_ticket(
    user: CurrentUser, context: Context, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> schemas.WsTicket:
    """A one-use ticket to open one WebSocket (`/ws/chat?ticket=...`), valid for seconds.

    What a browser should put in a WebSocket URL instead of its token: URLs are logged, and a
    logged ticket is already used or expired.
    """
    if context.tickets is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Tickets are not available")
    try:
        # The token was checked by CurrentUser; its expiry bounds the socket's life too.
        expires_at = decode_access_token(context.config.secret_key, token or "").expires_at
        ticket = await context.tickets.issue(user.id, user.token_version, expires_at)
    except Exception as exc:  # the ticket store (Redis) is unreachable
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            "Cannot issue a ticket right now; try again shortly",
            headers={"Retry-After": "5"},
        ) from exc
    return schemas.WsTicket(ticket=ticket, expires_in=context.tickets.ttl)
