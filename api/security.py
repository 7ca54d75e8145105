"""Passwords and tokens.

Hashing runs in a worker thread: argon2 is deliberately slow (tens of milliseconds), and the
event loop also carries every WebSocket of the node.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import anyio.to_thread
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()
ALGORITHM = "HS256"
# A precomputed hash to verify against when the user does not exist, so a wrong username
# costs as much time as a wrong password and logins do not reveal which usernames exist.
_DUMMY_HASH = _hasher.hash("not-a-real-password")


class InvalidToken(Exception):
    """Missing, malformed, badly signed or expired."""


@dataclass(frozen=True, slots=True)
class TokenClaims:
    user_id: int
    name: str
    role: str
    # Unix seconds (the `exp` claim): open WebSockets close then unless refreshed.
    expires_at: float | None = None


async def hash_password(password: str) -> str:
    return await anyio.to_thread.run_sync(_hasher.hash, password)


async def verify_password(password: str, password_hash: str | None) -> bool:
    def verify() -> bool:
        try:
            return _hasher.verify(password_hash or _DUMMY_HASH, password) and bool(password_hash)
        except (VerificationError, InvalidHashError):
            return False

    return await anyio.to_thread.run_sync(verify)


def create_access_token(
    secret: str, *, user_id: int, name: str, role: str, minutes: int, now: datetime | None = None
) -> str:
    issued = now or datetime.now(UTC)
    claims = {
        "sub": str(user_id),
        "name": name,
        "role": role,
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
            options={"require": ["exp", "iat", "sub"]},
        )
    except jwt.PyJWTError as exc:
        raise InvalidToken(str(exc)) from exc
    sub, name, role = claims.get("sub"), claims.get("name"), claims.get("role")
    if claims.get("typ") != "access" or not isinstance(sub, str) or not sub.isdigit():
        raise InvalidToken("not an access token")
    if not isinstance(name, str) or not isinstance(role, str) or len(sub) > 18:
        raise InvalidToken("malformed claims")
    exp = claims.get("exp")
    expires_at = float(exp) if isinstance(exp, int | float) else None
    return TokenClaims(user_id=int(sub), name=name, role=role, expires_at=expires_at)
