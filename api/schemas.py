"""Request and response bodies. Every input is bounded: length, charset, size, nesting."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Generic, Literal, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from realtime.protocol import NAME_PATTERN

MAX_DATA_BYTES = 64 * 1024


def _printable(value: str) -> str:
    # Control characters (NUL above all: PostgreSQL refuses it in text) and lone surrogates
    # (not encodable as UTF-8) would fail in the database as a 500; refuse them here as a 422.
    if any(ord(ch) < 32 or 0xD800 <= ord(ch) <= 0xDFFF or ord(ch) == 127 for ch in value):
        raise ValueError("must not contain control characters")
    return value


def _bounded_json(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = orjson.dumps(value)
    except orjson.JSONEncodeError as exc:  # lone surrogates, nesting deeper than 254
        raise ValueError(f"not storable as JSON: {exc}") from exc
    if len(encoded) > MAX_DATA_BYTES:
        raise ValueError(f"must be at most {MAX_DATA_BYTES} bytes as JSON")
    if b"\\u0000" in encoded:
        raise ValueError("must not contain NUL characters")
    return value


RoomName = Annotated[str, StringConstraints(pattern=f"^{NAME_PATTERN}$")]
Username = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.\-]{3,32}$")]
Password = Annotated[
    str, StringConstraints(min_length=8, max_length=128), AfterValidator(_printable)
]
DisplayName = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=64),
    AfterValidator(_printable),
]
Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=200),
    AfterValidator(_printable),
]
JsonObject = Annotated[dict[str, Any], AfterValidator(_bounded_json)]
Id = Annotated[int, Field(ge=1, le=2**31 - 1)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class UserCreate(Strict):
    username: Username
    password: Password
    display_name: DisplayName | None = None


class UserUpdate(Strict):
    display_name: DisplayName | None = None
    password: Password | None = Field(
        default=None,
        description="Needs `current_password` (unless an admin sets another user's); ends "
        "every token issued for the account before, this request's included.",
    )
    current_password: Annotated[str, StringConstraints(max_length=128)] | None = None
    role: Literal["user", "service", "admin"] | None = Field(
        default=None, description="Admins only."
    )


class UserOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    username: str
    display_name: str
    role: str
    is_guest: bool
    created_at: datetime


class GuestCreate(Strict):
    name: DisplayName


class Token(BaseModel):
    access_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 - the OAuth2 token type


class GuestToken(Token):
    user: UserOut


class WsTicket(BaseModel):
    ticket: str
    expires_in: float = Field(description="Seconds the ticket stays valid; it works once.")


class ItemCreate(Strict):
    title: Title
    data: JsonObject = Field(default_factory=dict)


class ItemUpdate(Strict):
    version: Annotated[int, Field(ge=1, le=2**31 - 1)] = Field(
        description="The version this change is based on; a stale one gets 409."
    )
    title: Title | None = None
    data: JsonObject | None = None


class ItemOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    owner_id: int
    title: str
    data: dict[str, Any]
    version: int
    created_at: datetime
    updated_at: datetime


class RoomCreate(Strict):
    name: RoomName
    private: bool = False
    members: list[Id] = Field(
        default_factory=list,
        max_length=1000,
        description="User ids of a private room's members; the creator is always one.",
    )


class RoomOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    name: str
    private: bool
    created_at: datetime


class UserRef(BaseModel):
    id: str
    name: str


class MessageOut(BaseModel):
    """The `message` event of the wire protocol."""

    type: Literal["message"] = "message"
    room: str
    epoch: str
    offset: int
    msg_id: str
    client_msg_id: str | None
    user: UserRef
    body: dict[str, Any]
    ts: str


class MessagePublish(Strict):
    """A service's publish: the `publish` command's fields, checked by the same rules."""

    body: dict[str, Any] = Field(description="Any JSON object, up to the server's body limit.")
    client_msg_id: str | None = Field(
        default=None,
        max_length=64,
        description="Makes the publish idempotent: a retry with the same id gets the first "
        "message's answer and publishes nothing twice.",
    )


class MessagePublished(BaseModel):
    """The ack's content: where the message is in the room."""

    room: str
    epoch: str
    offset: int
    msg_id: str


class MessageList(BaseModel):
    messages: list[MessageOut]
    has_more: bool


class MemberOut(BaseModel):
    user: UserRef
    connections: int


class PresenceOut(BaseModel):
    room: str
    members: list[MemberOut]


T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    items: list[T]
    total: int
