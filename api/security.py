"""Passwords and tokens.

Hashing runs in a worker thread: argon2 is deliberately slow (tens of milliseconds), and the
event loop also carries every WebSocket of the node. It is also deliberately large (64 MiB
per hash), so a node runs only a few at once (`HashingPool`): a burst of sign-ups or logins
waits in a short queue or is told to come back (503), rather than taking the node's memory.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import anyio
import anyio.to_thread
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from fastapi import HTTPException, status

_hasher = PasswordHasher()
ALGORITHM = "HS256"
# A precomputed hash to verify against when the user does not exist, so a wrong username
# costs as much time as a wrong password and logins do not reveal which usernames exist.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


T = TypeVar("T")


class InvalidToken(Exception):
    """Missing, malformed, badly signed or expired."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: int
    name: str
    role: str
    # The account's token version when the token was issued; a token whose version is not the
    # account's current one (password or role changed, or another account under a reused id)
    # is refused.
    version: int
    # Unix seconds (the `exp` claim): open WebSockets close then unless refreshed.
    expires_at: float | None = None


class HashingPool:
    """At most `concurrency` password hashes at once, and at most `queue` more waiting.

    Beyond that a request is refused at once with 503 and Retry-After: waiting longer would
    only hold its connection and memory while the answer gets no sooner.
    """

    def __init__(self, concurrency: int, queue: int) -> None:
        self.concurrency = concurrency
        self.queue = queue
        self._limiter: anyio.CapacityLimiter | None = None
        self._admitted = 0

    async def run(self, function: Callable[..., T], *args: object) -> T:
        if self._admitted >= self.concurrency + self.queue:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                "Too many sign-ins and sign-ups at once; try again shortly",
                headers={"Retry-After": "1"},
            )
        if self._limiter is None:  # made in the running event loop, which it belongs to
            self._limiter = anyio.CapacityLimiter(self.concurrency)
        self._admitted += 1
        try:
            return await anyio.to_thread.run_sync(function, *args, limiter=self._limiter)
        finally:
            self._admitted -= 1


async def _in_thread(pool: HashingPool | None, function: Callable[..., T], *args: object) -> T:
    if pool is None:
        return await anyio.to_thread.run_sync(function, *args)
    return await pool.run(function, *args)


async def hash_password(password: str, pool: HashingPool | None = None) -> str:
    return await _in_thread(pool, _hasher.hash, password)


async def verify_password(
    password: str, password_hash: str | None, pool: HashingPool | None = None
) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
        except (VerificationError, InvalidHashError):
            return False

    return await _in_thread(pool, verify)


def create_access_token(
    secret: str,
    *,
    user_id: int,
    name: str,
    role: str,
    version: int,
    minutes: int,
    now: datetime | None = None,
) -> str:
    issued = now or datetime.now(UTC)
    claims = {
        "sub": str(user_id),
        "name": name,
        "role": role,
        "ver": version,
        "iat": issued,
        "exp": issued + timedelta(minutes=minutes),
        "typ": "access",
    }
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def decode_access_token(secret: str, token: str) -> TokenClaims:
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["exp", "iat", "sub", "ver"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    sub, name, role = claims.get("sub"), claims.get("name"), claims.get("role")
    version = claims.get("ver")
    if claims.get("typ") != "access" or not isinstance(sub, str) or not sub.isdigit():
        raise InvalidToken("not an access token")
    if not isinstance(name, str) or not isinstance(role, str) or len(sub) > 18:
        raise InvalidToken("malformed claims")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidToken("malformed claims")
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, int | float) else None
    return TokenClaims(
        user_id=int(sub), name=name, role=role, version=version, expires_at=expires_at
    )


class VerifiedTokens:
    """Tokens this process has verified, with their claims, so a token seen again (a
    reconnect, another tab, many sockets of one service token) skips the signature check.

    Verifying a JWT (PyJWT: key preparation, base64, JSON, HMAC) was about a fifth of a
    WebSocket connect's time once the account read was remembered. The key is the whole
    token, signature included, so a hit is the same bytes that passed the check; its expiry
    is checked again on every use. Bounded: past `max_entries` the oldest are dropped.
    Whether the account still stands behind the token is not cached here (`api.accounts`).
    """

    def __init__(
        self, secret: str, max_entries: int = 10_000, clock: Callable[[], float] = time.time
    ) -> None:
        self.secret = secret
        self.max_entries = max_entries
        self._clock = clock
        self._claims: dict[str, TokenClaims] = {}

    def decode(self, token: str) -> TokenClaims:
        claims = self._claims.get(token)
        if claims is None:
            claims = decode_access_token(self.secret, token)
            if len(self._claims) >= self.max_entries:
                self._claims.pop(next(iter(self._claims)))
            self._claims[token] = claims
        elif claims.expires_at is not None and claims.expires_at <= self._clock():
            del self._claims[token]
            raise InvalidToken("Signature has expired")
        return claims
