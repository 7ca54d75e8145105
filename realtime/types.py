"""Small value types shared by the protocol, the hub and every backend."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


@dataclass(frozen=True, slots=True)
class UserInfo:
    """The authenticated user behind a connection, as it appears on the wire (`{"id", "name"}`).

    `role` and `expires_at` come from the token and decide what the connection may do and for
    how long (feed authorization, closing at expiry). They are no part of the user's identity:
    equality, hashing and the wire form use `id` and `name` only, so presence and messages
    see the same user whichever token a connection carries.
    """

    id: str
    name: str
    role: str = field(default="user", compare=False)
    # Unix seconds after which the token no longer holds; None for a token without expiry.
    expires_at: float | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, str]:
        return {"id": self.id, "name": self.name}


@dataclass(frozen=True, slots=True)
class Position:
    """A place in a room's or feed's stream: offsets count within one epoch only."""

    epoch: str
    offset: int


def new_msg_id() -> str:
    """A ULID: 48 bits of milliseconds then 80 random bits, 26 Crockford base32 characters.

    Sortable by creation time, unique without coordination between nodes.
    """
    value = (time.time_ns() // 1_000_000) << 80 | int.from_bytes(os.urandom(10), "big")
    chars = []
    for _ in range(26):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def new_epoch() -> str:
    """A short random name for one life of a stream's offset counter."""
    return os.urandom(4).hex()
