"""What routers depend on, as `Annotated` aliases, and the context the app's lifespan builds."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import OAuth2PasswordBearer
from sqlalchemy.ext.asyncio import AsyncSession

from api.accounts import AccountCache
from api.ratelimit import AddressLimiter, LoginFailureLimiter
from api.security import HashingPool, InvalidToken, decode_access_token
from api.services import GuestBatcher
from api.tickets import TicketStore
from persistence.database import SessionFactory
from persistence.models import Role, User
from persistence.repositories import UserRepository
from realtime.broker import PublishResult
from realtime.node import NodeLimits
from realtime.presence import Member
from realtime.protocol import Publish
from realtime.storage import HistoryReader
from realtime.types import Position, UserInfo

ReadinessCheck = Callable[[], Awaitable[bool]]


class Realtime(Protocol):
    """What the REST layer asks of the realtime node (`realtime.node.Node` provides it)."""

    async def presence_members(self, room: str) -> Sequence[Member]: ...

    @property
    def limits(self) -> NodeLimits: ...

    async def publish_feed(self, feed: str, data: Any) -> Position: ...

    async def publish_as(self, user: UserInfo, command: Publish) -> PublishResult:
        """A service's publish to a room, as a member's (see `Node.publish_as`)."""

    async def disconnect_user(self, user_id: str, code: int = ...) -> None:
        """Close the user's WebSockets on every node (account deleted, password changed);
        raises `realtime.broker.BrokerUnavailable` when other nodes could not be told."""


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """The settings the REST layer reads (built by `collab` from its Settings)."""

    secret_key: str
    access_token_minutes: int = 60 * 24
    guest_access: bool = True
    # Login and guest-token requests per second per client address, and their burst.
    auth_rate_limit: float = 5.0
    auth_rate_burst: int = 20
    # Sign-in attempts per username without a success (the `limits` notation).
    login_failure_limit: str = "10 per 5 minutes"
    ws_ticket_seconds: float = 30.0


@dataclass(slots=True)
class ApiContext:
    """Built by the lifespan; routers reach it through `request.app.state.api`."""

    config: ApiConfig
    sessions: SessionFactory
    readiness: dict[str, ReadinessCheck] = field(default_factory=dict)
    history: HistoryReader | None = None
    auth_limiter: AddressLimiter | None = None
    login_limiter: LoginFailureLimiter | None = None
    tickets: TicketStore | None = None
    hashing: HashingPool | None = None
    # Guest sign-ins written in batches (`POST /auth/guest`); unset: one transaction each.
    guests: GuestBatcher | None = None
    # Accounts behind WebSocket credentials, remembered briefly (`api.accounts`).
    accounts: AccountCache | None = None
    # Realtime services the REST layer uses (presence, feed publishing); set by `collab`.
    realtime: Realtime | None = None


def get_context(request: Request) -> ApiContext:
    context: ApiContext = request.app.state.api
    return context


Context = Annotated[ApiContext, Depends(get_context)]


async def get_session(context: Context) -> AsyncIterator[AsyncSession]:
    async with context.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]

oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/auth/token", auto_error=False)

_UNAUTHORIZED = HTTPException(
    status_code=status.HTTP_401_UNAUTHORIZED,
    detail="Not authenticated",
    headers={"WWW-Authenticate": "Bearer"},
)


async def get_current_user(
    context: Context, session: SessionDep, token: Annotated[str | None, Depends(oauth2_scheme)]
) -> User:
    if not token:
        raise _UNAUTHORIZED
    try:
        claims = decode_access_token(context.config.secret_key, token)
    except InvalidToken:
        raise _UNAUTHORIZED from None
    user = await token_holder(session, claims.user_id, claims.version)
    if user is None:
        raise _UNAUTHORIZED
    return user


async def token_holder(session: AsyncSession, user_id: int, version: int) -> User | None:
    """The account a token (or ticket) names, if it still stands behind it.

    None when the account was deleted, or when its token version moved on: the password or
    role changed since, or the id now belongs to another account.
    """
    user = await UserRepository(session).get(user_id)
    if user is None or user.token_version != version:
        return None
    return user


CurrentUser = Annotated[User, Depends(get_current_user)]


async def get_service_user(user: CurrentUser) -> User:
    if user.role not in (Role.SERVICE, Role.ADMIN):
        raise HTTPException(status.HTTP_403_FORBIDDEN, "A service or admin token is required")
    return user


ServiceUser = Annotated[User, Depends(get_service_user)]


async def get_admin_user(user: CurrentUser) -> User:
    if user.role != Role.ADMIN:
        raise HTTPException(status.HTTP_403_FORBIDDEN, "An admin token is required")
    return user


AdminUser = Annotated[User, Depends(get_admin_user)]


def limit_auth(request: Request, context: Context) -> None:
    """Rate-limit the credential routes per client address (429 with Retry-After)."""
    if context.auth_limiter is None:
        context.auth_limiter = AddressLimiter(
            context.config.auth_rate_limit, context.config.auth_rate_burst
        )
    context.auth_limiter(request)


AuthRateLimit = Depends(limit_auth)
