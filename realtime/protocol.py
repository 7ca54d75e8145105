"""The wire protocol of docs/PROTOCOL.md: commands parsed from frames, server frames encoded.

No I/O, no WebSocket, no asyncio: text or bytes in, a `Command` (or a `ProtocolError`) out,
and bytes for every frame the server sends. The endpoints only move frames between the socket
and the hub, so everything here is testable without a network.

Two kinds of failure are kept apart, as on the wire:

- `ProtocolError` (with an `ErrorCode`) answers one command with an `error` reply; the
  connection lives on.
- `CloseCode` names why a connection is closed, and tells the client whether to reconnect.

Parsing is on the publish hot path, so it validates strictly but cheaply: one `orjson.loads`,
plain `isinstance` checks and one precompiled regular expression per name; no schema library.

Encoders splice frames that are already encoded (message events from the broker, a feed's
snapshot) into their reply as raw bytes, through `orjson.Fragment`, never decoding them again:
a message is encoded once per node, however many replies carry it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum
from typing import Any, Literal, TypeAlias, TypeGuard

import orjson

from realtime.types import Position, UserInfo

__all__ = [
    "CLOSE_REASONS",
    "ERROR_EXPLANATIONS",
    "HISTORY_DEFAULT_LIMIT",
    "HISTORY_MAX_LIMIT",
    "MAX_ID_CHARS",
    "MAX_NAME_CHARS",
    "CloseCode",
    "Command",
    "CommandId",
    "Endpoint",
    "ErrorCode",
    "History",
    "Join",
    "Leave",
    "Ping",
    "PresenceQuery",
    "ProtocolError",
    "Publish",
    "Refresh",
    "Subscribe",
    "Typing",
    "Unsubscribe",
    "ack",
    "error",
    "history_reply",
    "is_valid_name",
    "joined",
    "left",
    "message_fields",
    "parse_command",
    "pong",
    "presence_diff",
    "presence_reply",
    "refreshed",
    "subscribed",
    "typing_event",
    "unsubscribed",
    "update_fields",
    "utc_timestamp",
    "welcome",
]

Endpoint: TypeAlias = Literal["chat", "live"]
CommandId: TypeAlias = int | str | None
"""A command's `id` as the client chose it; None when it sent none (replies then carry null)."""

MAX_ID_CHARS = 64
MAX_NAME_CHARS = 64
MAX_EPOCH_CHARS = 64
MAX_CLIENT_MSG_ID_CHARS = 64
# A JWT of ours is a few hundred characters; the bound keeps a hostile `refresh` cheap.
MAX_TOKEN_CHARS = 4096
HISTORY_DEFAULT_LIMIT = 50
HISTORY_MAX_LIMIT = 200

_INT64_MIN = -(2**63)
_INT64_MAX = 2**63 - 1

# PROTOCOL.md: "Room and feed names: 1 to 64 characters of `A-Z a-z 0-9 _ - . :`".
# fullmatch, so a trailing newline is no loophole (as it would be with `$`).
# Room and feed names (and epochs): the one pattern that REST paths, schemas and settings use.
NAME_PATTERN = r"[A-Za-z0-9_.:\-]{1,64}"
_NAME_RE = re.compile(NAME_PATTERN, re.ASCII)
# Control characters (C0, DEL, C1) in an id: a database may refuse them (PostgreSQL refuses
# NUL in text), and no client needs them; refused at the door, they never reach storage.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

# orjson refuses to *encode* documents nested deeper than about 254 containers, though it
# decodes up to 1024. A body we accept must still encode later inside the frames that carry
# it (a history reply holds it three levels down), so the size check encodes it under this
# many extra levels of array: a body that passes fits every frame, and the slice in between
# is the body's own encoding, reused for the message frame.
_BODY_DEPTH_MARGIN = 8  # the number of brackets around `body` in _parse_publish


class CloseCode(IntEnum):
    """WebSocket close codes of PROTOCOL.md; each tells the client what to do next."""

    NORMAL = 1000
    GOING_AWAY = 1001
    POLICY_VIOLATION = 1008
    MESSAGE_TOO_BIG = 1009
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013
    UNAUTHORIZED = 4401
    FORBIDDEN_ORIGIN = 4403
    TOO_SLOW = 4408
    TOO_MANY_CONNECTIONS = 4429


CLOSE_REASONS: dict[CloseCode, str] = {
    CloseCode.NORMAL: "normal close",
    CloseCode.GOING_AWAY: "server shutting down or restarting; reconnect and recover",
    CloseCode.POLICY_VIOLATION: "kept sending after rate_limited; reconnect later",
    CloseCode.MESSAGE_TOO_BIG: "frame over the frame size limit",
    CloseCode.INTERNAL_ERROR: "internal error; reconnect and recover",
    CloseCode.TRY_AGAIN_LATER: "this node is full; try again later",
    CloseCode.UNAUTHORIZED: "missing, invalid or expired token",
    CloseCode.FORBIDDEN_ORIGIN: "origin not allowed",
    CloseCode.TOO_SLOW: "too slow: outgoing queue overflowed; reconnect and recover",
    CloseCode.TOO_MANY_CONNECTIONS: "too many connections for this user",
}
"""The close reason sent with each code (RFC 6455 allows at most 123 bytes; these are short)."""


class ErrorCode(StrEnum):
    """The `code` of an `error` reply: the command failed, the connection lives on."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    NOT_JOINED = "not_joined"
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"
    INTERNAL = "internal"
    TOO_MANY_CHANNELS = "too_many_channels"
    UNAUTHORIZED = "unauthorized"


ERROR_EXPLANATIONS: dict[ErrorCode, str] = {
    ErrorCode.BAD_REQUEST: "malformed command: not JSON, not an object, unknown type or bad field",
    ErrorCode.FORBIDDEN: "not allowed to join this room or subscribe to this feed",
    ErrorCode.NOT_JOINED: "this connection has not joined the room",
    ErrorCode.TOO_LARGE: "message body over the size limit",
    ErrorCode.RATE_LIMITED: "too many commands; this one was not carried out",
    ErrorCode.UNAVAILABLE: "a backend is unavailable; the command was not carried out",
    ErrorCode.INTERNAL: "internal error; the command was not carried out",
    ErrorCode.TOO_MANY_CHANNELS: (
        "this connection has joined as many rooms and feeds as it may; leave one first"
    ),
    ErrorCode.UNAUTHORIZED: "the token is invalid, expired or names another user",
}
"""Default human text for each error code, used when nothing more specific is known."""


class ProtocolError(Exception):
    """A command that gets an `error` reply instead of being carried out.

    `id` is the command's id when it could be read (so the reply can echo it), else None.
    """

    code: ErrorCode
    message: str
    id: CommandId

    def __init__(self, code: ErrorCode, message: str | None = None, id: CommandId = None) -> None:
        self.code = code
        self.message = ERROR_EXPLANATIONS[code] if message is None else message
        self.id = id
        super().__init__(f"{code}: {self.message}")

    def frame(self) -> bytes:
        """The `error` reply for this failure."""
        return error(self.id, self.code, self.message)


# Commands ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Join:
    id: CommandId
    room: str
    since: Position | None
    presence_events: bool


@dataclass(frozen=True, slots=True)
class Leave:
    id: CommandId
    room: str


@dataclass(frozen=True, slots=True)
class Publish:
    """`body_size` is the body's compact JSON size, the one the limit applies to.

    `body_json` is the body's encoding, kept from the size check so that the hot path encodes
    each body once (`message_fields` takes it in place of `body`). It is left out of equality
    and repr, so a `Publish` built by hand compares equal to a parsed one.
    """

    id: CommandId
    room: str
    body: dict[str, Any]
    client_msg_id: str | None
    body_size: int
    body_json: bytes = field(default=b"", compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class Typing:
    id: CommandId
    room: str


@dataclass(frozen=True, slots=True)
class PresenceQuery:
    """The `presence` command (named apart from the presence backend)."""

    id: CommandId
    room: str


@dataclass(frozen=True, slots=True)
class History:
    id: CommandId
    room: str
    before: int | None
    limit: int


@dataclass(frozen=True, slots=True)
class Ping:
    id: CommandId


@dataclass(frozen=True, slots=True)
class Refresh:
    """A new token for an open connection, before the one it opened with expires."""

    id: CommandId
    token: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: CommandId
    feed: str
    since: Position | None


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: CommandId
    feed: str


Command: TypeAlias = (
    Join
    | Leave
    | Publish
    | Typing
    | PresenceQuery
    | History
    | Ping
    | Refresh
    | Subscribe
    | Unsubscribe
)


# Parsing -------------------------------------------------------------------------------------


def is_valid_name(name: object) -> bool:
    """Whether `name` is a valid room or feed name (also for the REST API's path parameters)."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def _is_int(value: object) -> TypeGuard[int]:
    """A JSON integer that fits in a signed 64-bit integer.

    bool is a subclass of int in Python but `true` is no number on the wire. orjson decodes
    integers up to 2**64 - 1 as int (and larger ones as float), so the upper bound is checked.
    """
    return type(value) is int and _INT64_MIN <= value <= _INT64_MAX


def _bad(command_id: CommandId, message: str) -> ProtocolError:
    return ProtocolError(ErrorCode.BAD_REQUEST, message, command_id)


def _name(obj: dict[str, Any], key: str, command_id: CommandId) -> str:
    value = obj.get(key)
    if type(value) is str and _NAME_RE.fullmatch(value) is not None:
        return value
    if value is None and key not in obj:
        raise _bad(command_id, f"field '{key}' is required")
    raise _bad(
        command_id,
        f"field '{key}' must be 1-{MAX_NAME_CHARS} characters of A-Z a-z 0-9 _ - . :",
    )


def _since(obj: dict[str, Any], command_id: CommandId) -> Position | None:
    value = obj.get("since")
    if value is None:
        return None
    if type(value) is not dict:
        raise _bad(command_id, "field 'since' must be an object with 'epoch' and 'offset'")
    epoch = value.get("epoch")
    if type(epoch) is not str or not 1 <= len(epoch) <= MAX_EPOCH_CHARS:
        raise _bad(
            command_id, f"field 'since.epoch' must be a string of 1-{MAX_EPOCH_CHARS} characters"
        )
    offset = value.get("offset")
    if not _is_int(offset) or offset < 0:
        raise _bad(command_id, "field 'since.offset' must be an integer >= 0")
    return Position(epoch, offset)


def _parse_join(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    room = _name(obj, "room", command_id)
    since = _since(obj, command_id)
    presence_events = obj.get("presence_events", True)
    if presence_events is None:
        presence_events = True
    elif type(presence_events) is not bool:
        raise _bad(command_id, "field 'presence_events' must be true or false")
    return Join(command_id, room, since, presence_events)


def _parse_leave(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    return Leave(command_id, _name(obj, "room", command_id))


def _parse_publish(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    room = _name(obj, "room", command_id)
    body = obj.get("body")
    if type(body) is not dict:
        if body is None and "body" not in obj:
            raise _bad(command_id, "field 'body' is required")
        raise _bad(command_id, "field 'body' must be a JSON object")
    try:
        wrapped = orjson.dumps([[[[[[[[body]]]]]]]])
    except orjson.JSONEncodeError:
        # Only depth can fail here: decoded JSON has str keys and encodable values.
        raise _bad(command_id, "field 'body' is nested too deeply") from None
    body_json = wrapped[_BODY_DEPTH_MARGIN:-_BODY_DEPTH_MARGIN]
    body_size = len(body_json)
    if body_size > max_body_bytes:
        raise ProtocolError(
            ErrorCode.TOO_LARGE,
            f"field 'body' is {body_size} bytes serialized; the limit is {max_body_bytes}",
            command_id,
        )
    client_msg_id = obj.get("client_msg_id")
    if client_msg_id is not None and (
        type(client_msg_id) is not str
        or not 1 <= len(client_msg_id) <= MAX_CLIENT_MSG_ID_CHARS
        or _CONTROL_RE.search(client_msg_id)
    ):
        raise _bad(
            command_id,
            f"field 'client_msg_id' must be a string of 1-{MAX_CLIENT_MSG_ID_CHARS} characters"
            " without control characters",
        )
    return Publish(command_id, room, body, client_msg_id, body_size, body_json)


def _parse_typing(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    return Typing(command_id, _name(obj, "room", command_id))


def _parse_presence(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    return PresenceQuery(command_id, _name(obj, "room", command_id))


def _parse_history(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    room = _name(obj, "room", command_id)
    before = obj.get("before")
    if before is not None and (not _is_int(before) or before < 1):
        raise _bad(command_id, "field 'before' must be an integer >= 1")
    limit = obj.get("limit")
    if limit is None:
        limit = HISTORY_DEFAULT_LIMIT
    elif not _is_int(limit) or not 1 <= limit <= HISTORY_MAX_LIMIT:
        raise _bad(command_id, f"field 'limit' must be an integer from 1 to {HISTORY_MAX_LIMIT}")
    return History(command_id, room, before, limit)


def _parse_ping(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    return Ping(command_id)


def _parse_refresh(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    token = obj.get("token")
    if type(token) is not str or not 1 <= len(token) <= MAX_TOKEN_CHARS:
        raise _bad(command_id, f"field 'token' must be a string of 1-{MAX_TOKEN_CHARS} characters")
    return Refresh(command_id, token)


def _parse_subscribe(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    feed = _name(obj, "feed", command_id)
    return Subscribe(command_id, feed, _since(obj, command_id))


def _parse_unsubscribe(obj: dict[str, Any], command_id: CommandId, max_body_bytes: int) -> Command:
    return Unsubscribe(command_id, _name(obj, "feed", command_id))


_Parser: TypeAlias = Callable[[dict[str, Any], CommandId, int], Command]

_CHAT_PARSERS: dict[str, _Parser] = {
    "join": _parse_join,
    "leave": _parse_leave,
    "publish": _parse_publish,
    "typing": _parse_typing,
    "presence": _parse_presence,
    "history": _parse_history,
    "ping": _parse_ping,
    "refresh": _parse_refresh,
}
_LIVE_PARSERS: dict[str, _Parser] = {
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "ping": _parse_ping,
    "refresh": _parse_refresh,
}
_PARSERS: dict[str, dict[str, _Parser]] = {"chat": _CHAT_PARSERS, "live": _LIVE_PARSERS}
_OTHER_ENDPOINT: dict[str, tuple[str, dict[str, _Parser]]] = {
    "chat": ("/ws/live", _LIVE_PARSERS),
    "live": ("/ws/chat", _CHAT_PARSERS),
}


def _read_id(obj: dict[str, Any]) -> tuple[CommandId, bool]:
    """The command's id and whether it is valid; read first, so later errors can echo it."""
    value = obj.get("id")
    if value is None:
        return None, True
    if type(value) is str:
        return (value, True) if len(value) <= MAX_ID_CHARS else (None, False)
    if _is_int(value):
        return value, True
    return None, False


def parse_command(data: str | bytes, endpoint: Endpoint, *, max_body_bytes: int) -> Command:
    """Parse one client frame received on `/ws/<endpoint>`.

    Raises `ProtocolError` (and nothing else, whatever `data` holds): `bad_request` for
    anything malformed, `too_large` for a publish body over `max_body_bytes` serialized.
    The error carries the command's id when it is valid, so the reply can echo it.

    Unknown fields are ignored (newer clients may send more); an optional field given as
    null counts as absent.
    """
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        # Also integers too large for a float, invalid UTF-8 and nesting over orjson's limit.
        raise _bad(None, "frame is not valid JSON") from None
    if type(obj) is not dict:
        raise _bad(None, "frame must be a JSON object")
    command_id, id_ok = _read_id(obj)
    if not id_ok:
        raise _bad(
            None, f"field 'id' must be an integer or a string of at most {MAX_ID_CHARS} characters"
        )
    kind = obj.get("type")
    if type(kind) is not str:
        if kind is None and "type" not in obj:
            raise _bad(command_id, "field 'type' is required")
        raise _bad(command_id, "field 'type' must be a string")
    parser = _PARSERS[endpoint].get(kind)
    if parser is None:
        other_path, other_parsers = _OTHER_ENDPOINT[endpoint]
        if kind in other_parsers:
            raise _bad(command_id, f"command '{kind}' is only available on {other_path}")
        shown = kind if len(kind) <= 32 else kind[:32] + "..."
        raise _bad(command_id, f"unknown command type {shown!r}")
    return parser(obj, command_id, max_body_bytes)


# Encoding ------------------------------------------------------------------------------------


def _array(frames: Sequence[bytes]) -> orjson.Fragment:
    """A JSON array of already-encoded values, for orjson to copy in as it is."""
    return orjson.Fragment(b"[" + b",".join(frames) + b"]")


def welcome(
    session: str,
    node: str,
    user: UserInfo,
    heartbeat: float,
    limits: dict[str, Any],
) -> bytes:
    """The server's first frame on a connection. `expires_at` (when the token says) tells the
    client by when to send `refresh`, or be closed with 4401."""
    frame: dict[str, Any] = {
        "type": "welcome",
        "session": session,
        "node": node,
        "user": user.as_dict(),
        "heartbeat": heartbeat,
        "limits": limits,
    }
    if user.expires_at is not None:
        frame["expires_at"] = _number(user.expires_at)
    return orjson.dumps(frame)


def refreshed(id: CommandId, expires_at: float | None) -> bytes:
    """Reply to `refresh`: the connection now lives until the new token's expiry."""
    return orjson.dumps(
        {
            "type": "refreshed",
            "id": id,
            "expires_at": None if expires_at is None else _number(expires_at),
        }
    )


def _number(value: float) -> float | int:
    return int(value) if float(value).is_integer() else value


def joined(
    id: CommandId,
    room: str,
    epoch: str,
    offset: int,
    presence: Sequence[dict[str, Any]] | bytes,
    recovered: bool,
    missed_frames: Sequence[bytes],
    *,
    already_joined: bool = False,
    presence_truncated: bool = False,
) -> bytes:
    """Reply to `join`. `missed_frames` are encoded `message` events, spliced in unparsed;
    `presence` may come encoded (a JSON array's bytes).

    `already_joined` marks the answer to a repeat join, made from this node's own state
    (no backend is asked): `presence` is then not repeated and comes empty.
    `presence_truncated` says the member list was cut to fit one reply."""
    frame: dict[str, Any] = {
        "type": "joined",
        "id": id,
        "room": room,
        "epoch": epoch,
        "offset": offset,
        "presence": _list(presence),
        "recovered": recovered,
        "missed": _array(missed_frames),
    }
    if already_joined:
        frame["already_joined"] = True
    if presence_truncated:
        frame["presence_truncated"] = True
    return orjson.dumps(frame)


def _list(values: Sequence[Any] | bytes) -> Any:
    return orjson.Fragment(values) if isinstance(values, bytes) else list(values)


def left(id: CommandId, room: str) -> bytes:
    """Reply to `leave`."""
    return orjson.dumps({"type": "left", "id": id, "room": room})


def ack(id: CommandId, room: str, offset: int, msg_id: str) -> bytes:
    """Reply to `publish`, once the message is accepted."""
    return orjson.dumps({"type": "ack", "id": id, "room": room, "offset": offset, "msg_id": msg_id})


def typing_event(room: str, user: UserInfo) -> bytes:
    """Event to the other members of a room."""
    return orjson.dumps({"type": "typing", "room": room, "user": user.as_dict()})


def presence_reply(
    id: CommandId,
    room: str,
    members: Sequence[dict[str, Any]] | bytes,
    *,
    members_truncated: bool = False,
) -> bytes:
    """Reply to `presence`; members as `{"user": {...}, "connections": n}` (or their JSON
    array, encoded). `members_truncated` says the list was cut to fit one reply."""
    frame: dict[str, Any] = {"type": "presence", "id": id, "room": room, "members": _list(members)}
    if members_truncated:
        frame["members_truncated"] = True
    return orjson.dumps(frame)


def presence_diff(
    room: str, joins: Sequence[dict[str, Any]], leaves: Sequence[dict[str, Any]]
) -> bytes:
    """Event: users whose first connection joined, or last connection left, the room."""
    return orjson.dumps(
        {"type": "presence_diff", "room": room, "joins": list(joins), "leaves": list(leaves)}
    )


def history_reply(
    id: CommandId,
    room: str,
    messages: Sequence[bytes | dict[str, Any]],
    has_more: bool,
) -> bytes:
    """Reply to `history`, oldest first. Each message is an encoded `message` event (spliced
    in unparsed) or its dict (as `StoredMessage.event()` gives)."""
    frames = [m if isinstance(m, bytes) else orjson.dumps(m) for m in messages]
    return orjson.dumps(
        {
            "type": "history",
            "id": id,
            "room": room,
            "messages": _array(frames),
            "has_more": has_more,
        }
    )


def pong(id: CommandId) -> bytes:
    """Reply to `ping`."""
    return orjson.dumps({"type": "pong", "id": id})


def error(id: CommandId, code: ErrorCode, message: str) -> bytes:
    """The reply to a command that failed; the connection lives on."""
    return orjson.dumps({"type": "error", "id": id, "code": code.value, "message": message})


def delivery_unknown(id: CommandId, room: str, reason: str) -> bytes:
    """The reply to a publish whose broker reply was lost: an `unavailable` that, unlike
    every other, cannot say "not carried out", since the broker may have run it (or may yet:
    a stalled Redis runs what it was sent when it wakes). `delivery: "unknown"` says so. A
    retry with the same `client_msg_id` tells: it gets the first message's ack if that one
    went out, and publishes it otherwise, so the room has it once either way."""
    return orjson.dumps(
        {
            "type": "error",
            "id": id,
            "code": ErrorCode.UNAVAILABLE.value,
            "message": f"the broker's reply was lost ({reason}); the message may have been "
            "delivered: retry with the same client_msg_id",
            "delivery": "unknown",
            "room": room,
        }
    )


def unconfirmed_publish(
    id: CommandId, code: ErrorCode, message: str, room: str, offset: int, msg_id: str
) -> bytes:
    """The reply to a publish that was delivered but whose storage was not confirmed.

    Not an ack, since storage did not confirm; not a plain error either, since every member
    already has the message. `outcome: "unknown"` says so, with the position the message
    has. A retry with the same `client_msg_id` is safe: it gets this message's ack, and
    nothing is sent twice. Without a retry the reconciler still stores the message.
    """
    return orjson.dumps(
        {
            "type": "error",
            "id": id,
            "code": code.value,
            "message": message,
            "outcome": "unknown",
            "room": room,
            "offset": offset,
            "msg_id": msg_id,
        }
    )


def subscribed(
    id: CommandId,
    feed: str,
    epoch: str,
    offset: int,
    snapshot_json: bytes,
    recovered: bool,
    missed_frames: Sequence[bytes],
    *,
    snapshot_truncated: bool = False,
) -> bytes:
    """Reply to `subscribe`. `snapshot_json` is an encoded JSON value (`b"null"` for none) and
    `missed_frames` encoded `update` events; both are spliced in unparsed.

    `snapshot_truncated` says the snapshot was cut to fit one reply (a list keeps its newest
    entries; anything else becomes null): the rest is for the REST API to page through."""
    frame: dict[str, Any] = {
        "type": "subscribed",
        "id": id,
        "feed": feed,
        "epoch": epoch,
        "offset": offset,
        "snapshot": orjson.Fragment(snapshot_json),
        "recovered": recovered,
        "missed": _array(missed_frames),
    }
    if snapshot_truncated:
        frame["snapshot_truncated"] = True
    return orjson.dumps(frame)


def unsubscribed(id: CommandId, feed: str) -> bytes:
    """Reply to `unsubscribe`."""
    return orjson.dumps({"type": "unsubscribed", "id": id, "feed": feed})


def message_fields(
    msg_id: str,
    client_msg_id: str | None,
    user: UserInfo,
    body: dict[str, Any] | bytes,
    ts: str,
) -> bytes:
    """The members of a `message` event that follow type/room/epoch/offset, as a JSON object's
    bytes for `Broker.publish(fields=...)`. `body` may be given encoded (`Publish.body_json`)
    so the hot path does not encode it twice."""
    return orjson.dumps(
        {
            "msg_id": msg_id,
            "client_msg_id": client_msg_id,
            "user": user.as_dict(),
            "body": orjson.Fragment(body) if isinstance(body, bytes) else body,
            "ts": ts,
        }
    )


def update_fields(data: Any, ts: str) -> bytes:
    """The members of a feed's `update` event that follow type/feed/epoch/offset, for
    `Broker.publish(fields=...)`. `data` may be given encoded, as bytes."""
    return orjson.dumps(
        {"data": orjson.Fragment(data) if isinstance(data, bytes) else data, "ts": ts}
    )


def utc_timestamp(unix_ms: int | None = None) -> str:
    """ISO 8601 UTC with milliseconds and a Z, as messages carry it: "2026-11-26T10:00:00.123Z".

    `unix_ms` (milliseconds since the epoch) defaults to now; one integer, so the seconds and
    the milliseconds can't come from two readings of the clock.
    """
    if unix_ms is None:
        unix_ms = time.time_ns() // 1_000_000
    seconds, millis = divmod(unix_ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"
