"""The wire protocol in isolation: frames in, commands or errors out; server frames encoded to
exactly the shapes of PROTOCOL.md. No network, no event loop."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from realtime.protocol import (
    CLOSE_REASONS,
    ERROR_EXPLANATIONS,
    CloseCode,
    Command,
    Endpoint,
    ErrorCode,
    History,
    Join,
    Leave,
    Ping,
    PresenceQuery,
    ProtocolError,
    Publish,
    Subscribe,
    Typing,
    Unsubscribe,
    ack,
    error,
    history_reply,
    is_valid_name,
    joined,
    left,
    message_fields,
    parse_command,
    pong,
    presence_diff,
    presence_reply,
    subscribed,
    typing_event,
    unsubscribed,
    update_fields,
    utc_timestamp,
    welcome,
)
from realtime.storage import StoredMessage
from realtime.types import Position, UserInfo

LIMIT = 16384
ANN = UserInfo("42", "ann")
COMMAND_TYPES = (Join, Leave, Publish, Typing, PresenceQuery, History, Ping, Subscribe, Unsubscribe)
BAD = ErrorCode.BAD_REQUEST


def parse(frame: str | bytes, endpoint: Endpoint = "chat", max_body_bytes: int = LIMIT) -> Command:
    return parse_command(frame, endpoint, max_body_bytes=max_body_bytes)


def outcome(
    data: str | bytes, endpoint: Endpoint = "chat", max_body_bytes: int = LIMIT
) -> Command | ProtocolError:
    """The command, or the error; any other exception propagates and fails the test."""
    try:
        return parse_command(data, endpoint, max_body_bytes=max_body_bytes)
    except ProtocolError as exc:
        return exc


def frame(**fields: Any) -> bytes:
    """A command frame; stdlib json so tests can send what orjson would refuse to encode."""
    return json.dumps(fields, ensure_ascii=False).encode()


def nested(depth: int) -> dict[str, Any]:
    """A body whose innermost value sits inside `depth` containers, the body included."""
    value: Any = 1
    for _ in range(depth - 1):
        value = [value]
    return {"a": value}


# Malformed frames --------------------------------------------------------------------------

MALFORMED: list[tuple[str, str | bytes, Endpoint, ErrorCode, int | str | None]] = [
    # Not JSON at all, or JSON that orjson refuses.
    ("empty", b"", "chat", BAD, None),
    ("text", b"hello", "chat", BAD, None),
    ("truncated", b'{"type": "ping", "id": 1', "chat", BAD, None),
    ("trailing garbage", b'{"type": "ping", "id": 1} x', "chat", BAD, None),
    ("invalid utf-8", b'{"type": "ping", "id": "\xff"}', "chat", BAD, None),
    ("lone surrogate escape", b'{"type": "ping", "id": "\\ud800"}', "chat", BAD, None),
    ("lone surrogate in str", '{"type": "ping", "id": "\ud800"}', "chat", BAD, None),
    ("NaN", b'{"type": "ping", "id": NaN}', "chat", BAD, None),
    ("infinite float", b'{"type": "ping", "id": 1, "x": 1e400}', "chat", BAD, None),
    ("deep arrays", b"[" * 100_000, "chat", BAD, None),
    ("deep arrays closed", b"[" * 100_000 + b"]" * 100_000, "chat", BAD, None),
    (
        "deep field",
        b'{"type": "ping", "id": 1, "x": ' + b"[" * 2000 + b"]" * 2000 + b"}",
        "chat",
        BAD,
        None,
    ),
    # JSON, but not an object.
    ("array", b'[{"type": "ping", "id": 1}]', "chat", BAD, None),
    ("string", b'"ping"', "chat", BAD, None),
    ("number", b"42", "chat", BAD, None),
    ("null", b"null", "chat", BAD, None),
    ("true", b"true", "chat", BAD, None),
    # Bad ids: never echoed.
    ("id true", frame(type="ping", id=True), "chat", BAD, None),
    ("id false", frame(type="ping", id=False), "chat", BAD, None),
    ("id float", frame(type="ping", id=1.5), "chat", BAD, None),
    ("id integral float", frame(type="ping", id=1.0), "chat", BAD, None),
    ("id list", frame(type="ping", id=[1]), "chat", BAD, None),
    ("id object", frame(type="ping", id={"a": 1}), "chat", BAD, None),
    ("id 65 chars", frame(type="ping", id="x" * 65), "chat", BAD, None),
    ("id 10**30", frame(type="ping", id=10**30), "chat", BAD, None),
    ("id 2**64", frame(type="ping", id=2**64), "chat", BAD, None),
    ("id 2**63 (u64 but not i64)", frame(type="ping", id=2**63), "chat", BAD, None),
    ("id -2**63-1", frame(type="ping", id=-(2**63) - 1), "chat", BAD, None),
    ("bad id wins over bad type", frame(type="nope", id=True), "chat", BAD, None),
    # Type.
    ("no type", frame(id=7), "chat", BAD, 7),
    ("type null", frame(type=None, id=7), "chat", BAD, 7),
    ("type number", frame(type=1, id=7), "chat", BAD, 7),
    ("type list", frame(type=["ping"], id=7), "chat", BAD, 7),
    ("type empty", frame(type="", id=7), "chat", BAD, 7),
    ("type wrong case", frame(type="PING", id=7), "chat", BAD, 7),
    ("server-only type", frame(type="message", id=7, room="general"), "chat", BAD, 7),
    ("reply type", frame(type="ack", id="r1"), "chat", BAD, "r1"),
    ("long unknown type", frame(type="x" * 10_000, id=7), "chat", BAD, 7),
    # Commands on the wrong endpoint.
    ("join on live", frame(type="join", id=1, room="general"), "live", BAD, 1),
    ("leave on live", frame(type="leave", id=1, room="general"), "live", BAD, 1),
    ("publish on live", frame(type="publish", id=1, room="g", body={}), "live", BAD, 1),
    ("typing on live", frame(type="typing", id=1, room="general"), "live", BAD, 1),
    ("presence on live", frame(type="presence", id=1, room="general"), "live", BAD, 1),
    ("history on live", frame(type="history", id=1, room="general"), "live", BAD, 1),
    ("subscribe on chat", frame(type="subscribe", id=1, feed="items"), "chat", BAD, 1),
    ("unsubscribe on chat", frame(type="unsubscribe", id=1, feed="items"), "chat", BAD, 1),
    # Room names.
    ("room missing", frame(type="join", id=2), "chat", BAD, 2),
    ("room null", frame(type="join", id=2, room=None), "chat", BAD, 2),
    ("room empty", frame(type="join", id=2, room=""), "chat", BAD, 2),
    ("room 65 chars", frame(type="join", id=2, room="a" * 65), "chat", BAD, 2),
    ("room space", frame(type="join", id=2, room="gen eral"), "chat", BAD, 2),
    ("room slash", frame(type="join", id=2, room="a/b"), "chat", BAD, 2),
    ("room backslash", frame(type="join", id=2, room="a\\b"), "chat", BAD, 2),
    ("room newline", frame(type="join", id=2, room="general\n"), "chat", BAD, 2),
    ("room NUL", frame(type="join", id=2, room="general\x00"), "chat", BAD, 2),
    ("room accented", frame(type="join", id=2, room="café"), "chat", BAD, 2),
    ("room unicode letters", frame(type="join", id=2, room="общий"), "chat", BAD, 2),
    ("room unicode digits", frame(type="join", id=2, room="room\uff11"), "chat", BAD, 2),
    ("room kelvin sign", frame(type="join", id=2, room="\u212a"), "chat", BAD, 2),
    ("room emoji", frame(type="join", id=2, room="\U0001f600"), "chat", BAD, 2),
    ("room number", frame(type="join", id=2, room=5), "chat", BAD, 2),
    ("room list", frame(type="join", id=2, room=["general"]), "chat", BAD, 2),
    ("leave bad room", frame(type="leave", id=2, room="a b"), "chat", BAD, 2),
    ("typing bad room", frame(type="typing", id=2, room=""), "chat", BAD, 2),
    ("presence bad room", frame(type="presence", id=2, room="/"), "chat", BAD, 2),
    ("history bad room", frame(type="history", id=2), "chat", BAD, 2),
    ("publish bad room", frame(type="publish", id=2, room="a" * 65, body={}), "chat", BAD, 2),
    # Feed names.
    ("feed missing", frame(type="subscribe", id="s"), "live", BAD, "s"),
    ("feed empty", frame(type="subscribe", id="s", feed=""), "live", BAD, "s"),
    ("feed 65 chars", frame(type="subscribe", id="s", feed="f" * 65), "live", BAD, "s"),
    ("feed slash", frame(type="subscribe", id="s", feed="a/b"), "live", BAD, "s"),
    ("feed number", frame(type="subscribe", id="s", feed=1), "live", BAD, "s"),
    ("unsubscribe bad feed", frame(type="unsubscribe", id="s", feed="é"), "live", BAD, "s"),
    # since.
    ("since string", frame(type="join", id=3, room="g", since="9f2c:41"), "chat", BAD, 3),
    ("since list", frame(type="join", id=3, room="g", since=["9f2c", 41]), "chat", BAD, 3),
    ("since empty", frame(type="join", id=3, room="g", since={}), "chat", BAD, 3),
    ("since no offset", frame(type="join", id=3, room="g", since={"epoch": "e"}), "chat", BAD, 3),
    ("since no epoch", frame(type="join", id=3, room="g", since={"offset": 1}), "chat", BAD, 3),
    (
        "since empty epoch",
        frame(type="join", id=3, room="g", since={"epoch": "", "offset": 1}),
        "chat",
        BAD,
        3,
    ),
    (
        "since long epoch",
        frame(type="join", id=3, room="g", since={"epoch": "e" * 65, "offset": 1}),
        "chat",
        BAD,
        3,
    ),
    (
        "since epoch number",
        frame(type="join", id=3, room="g", since={"epoch": 9, "offset": 1}),
        "chat",
        BAD,
        3,
    ),
    (
        "since negative offset",
        frame(type="join", id=3, room="g", since={"epoch": "e", "offset": -1}),
        "chat",
        BAD,
        3,
    ),
    (
        "since float offset",
        frame(type="join", id=3, room="g", since={"epoch": "e", "offset": 1.0}),
        "chat",
        BAD,
        3,
    ),
    (
        "since bool offset",
        frame(type="join", id=3, room="g", since={"epoch": "e", "offset": True}),
        "chat",
        BAD,
        3,
    ),
    (
        "since string offset",
        frame(type="join", id=3, room="g", since={"epoch": "e", "offset": "1"}),
        "chat",
        BAD,
        3,
    ),
    (
        "since huge offset",
        frame(type="join", id=3, room="g", since={"epoch": "e", "offset": 10**30}),
        "chat",
        BAD,
        3,
    ),
    (
        "subscribe bad since",
        frame(type="subscribe", id=3, feed="items", since={"epoch": "e", "offset": -5}),
        "live",
        BAD,
        3,
    ),
    # presence_events.
    (
        "presence_events string",
        frame(type="join", id=4, room="g", presence_events="false"),
        "chat",
        BAD,
        4,
    ),
    ("presence_events 0", frame(type="join", id=4, room="g", presence_events=0), "chat", BAD, 4),
    # history.
    ("before 0", frame(type="history", id=5, room="g", before=0), "chat", BAD, 5),
    ("before negative", frame(type="history", id=5, room="g", before=-3), "chat", BAD, 5),
    ("before string", frame(type="history", id=5, room="g", before="58"), "chat", BAD, 5),
    ("before bool", frame(type="history", id=5, room="g", before=True), "chat", BAD, 5),
    ("before float", frame(type="history", id=5, room="g", before=58.0), "chat", BAD, 5),
    ("before huge", frame(type="history", id=5, room="g", before=10**30), "chat", BAD, 5),
    ("limit 0", frame(type="history", id=5, room="g", limit=0), "chat", BAD, 5),
    ("limit 201", frame(type="history", id=5, room="g", limit=201), "chat", BAD, 5),
    ("limit negative", frame(type="history", id=5, room="g", limit=-1), "chat", BAD, 5),
    ("limit string", frame(type="history", id=5, room="g", limit="50"), "chat", BAD, 5),
    ("limit bool", frame(type="history", id=5, room="g", limit=True), "chat", BAD, 5),
    ("limit float", frame(type="history", id=5, room="g", limit=50.0), "chat", BAD, 5),
    # publish.
    ("body missing", frame(type="publish", id=6, room="g"), "chat", BAD, 6),
    ("body null", frame(type="publish", id=6, room="g", body=None), "chat", BAD, 6),
    ("body string", frame(type="publish", id=6, room="g", body="hi"), "chat", BAD, 6),
    ("body list", frame(type="publish", id=6, room="g", body=[{"text": "hi"}]), "chat", BAD, 6),
    ("body number", frame(type="publish", id=6, room="g", body=1), "chat", BAD, 6),
    ("body too deep", frame(type="publish", id=6, room="g", body=nested(300)), "chat", BAD, 6),
    (
        "body over the limit",
        frame(type="publish", id="p", room="g", body={"text": "x" * LIMIT}),
        "chat",
        ErrorCode.TOO_LARGE,
        "p",
    ),
    (
        "client_msg_id empty",
        frame(type="publish", id=6, room="g", body={}, client_msg_id=""),
        "chat",
        BAD,
        6,
    ),
    (
        "client_msg_id 65 chars",
        frame(type="publish", id=6, room="g", body={}, client_msg_id="c" * 65),
        "chat",
        BAD,
        6,
    ),
    (
        "client_msg_id number",
        frame(type="publish", id=6, room="g", body={}, client_msg_id=7),
        "chat",
        BAD,
        6,
    ),
]


@pytest.mark.parametrize(
    ("data", "endpoint", "code", "echoed_id"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
def test_malformed_frames_get_the_right_error(
    data: str | bytes, endpoint: Endpoint, code: ErrorCode, echoed_id: int | str | None
) -> None:
    with pytest.raises(ProtocolError) as info:
        parse(data, endpoint)
    assert info.value.code == code
    assert info.value.id == echoed_id
    assert type(info.value.id) is type(echoed_id)  # 1 is not True
    assert info.value.message
    reply = orjson.loads(info.value.frame())
    assert reply == {
        "type": "error",
        "id": echoed_id,
        "code": code.value,
        "message": reply["message"],
    }


def test_error_messages_say_what_was_wrong() -> None:
    cases = {
        frame(type="join", id=1, room="a b"): (
            "field 'room' must be 1-64 characters of A-Z a-z 0-9 _ - . :"
        ),
        frame(type="join", id=1): "field 'room' is required",
        frame(type="history", id=1, room="g", limit=201): "field 'limit'",
        frame(type="ping", id=True): "field 'id'",
        frame(type="nope"): "unknown command type 'nope'",
        b"[]": "JSON object",
        b"{": "not valid JSON",
    }
    for data, expected in cases.items():
        with pytest.raises(ProtocolError, match=re.escape(expected)):
            parse(data)
    with pytest.raises(ProtocolError, match="/ws/live"):
        parse(frame(type="subscribe", feed="items"))
    with pytest.raises(ProtocolError, match="/ws/chat"):
        parse(frame(type="publish", room="g", body={}), "live")


def test_body_limit_is_on_compact_serialized_size() -> None:
    body = {"t": "x" * 100}
    size = len(orjson.dumps(body))
    # Whitespace in the client's frame does not count; the body's own encoding does.
    spaced = b'{"type": "publish", "room": "g", "body":   {  "t" :  "' + b"x" * 100 + b'"  }  }'
    command = parse(spaced, max_body_bytes=size)
    assert isinstance(command, Publish)
    assert command.body_size == size
    assert command.body_json == orjson.dumps(body)
    with pytest.raises(ProtocolError) as info:
        parse(spaced, max_body_bytes=size - 1)
    assert info.value.code == ErrorCode.TOO_LARGE
    assert info.value.id is None
    assert str(size) in info.value.message


def test_any_accepted_body_still_encodes_inside_every_frame() -> None:
    """orjson decodes deeper documents than it encodes: an accepted body must survive being
    carried several levels down (history reply > message event > body)."""
    deepest = 200
    while not isinstance(
        outcome(frame(type="publish", room="g", body=nested(deepest + 1))), ProtocolError
    ):
        deepest += 1
        assert deepest < 260
    refused = outcome(frame(type="publish", room="g", body=nested(deepest + 1)))
    assert isinstance(refused, ProtocolError)
    assert refused.code == BAD
    assert "nested" in refused.message
    command = parse(frame(type="publish", room="g", body=nested(deepest)))
    assert isinstance(command, Publish)
    message = StoredMessage("01J", "g", "e", 1, ANN, command.body, None, "ts")
    fields = message_fields("01J", None, ANN, command.body, "ts")
    reply = history_reply(1, "g", [message.event(), broker_frame("g", "e", 1, fields)], False)
    assert orjson.loads(reply)["messages"][1]["body"] == command.body
    assert orjson.loads(orjson.dumps({"messages": [message.event()]}))


# Good frames -------------------------------------------------------------------------------

GOOD: list[tuple[str, bytes, Endpoint, Command]] = [
    (
        "join, all fields",
        frame(type="join", id=1, room="general", since={"epoch": "9f2c", "offset": 41}),
        "chat",
        Join(1, "general", Position("9f2c", 41), True),
    ),
    (
        "join, minimal",
        frame(type="join", room="general"),
        "chat",
        Join(None, "general", None, True),
    ),
    (
        "join, no presence events",
        frame(type="join", id="j", room="big", presence_events=False),
        "chat",
        Join("j", "big", None, False),
    ),
    (
        "join, nulls are absent",
        frame(type="join", id=None, room="g", since=None, presence_events=None),
        "chat",
        Join(None, "g", None, True),
    ),
    (
        "join, since offset 0",
        frame(type="join", id=1, room="g", since={"epoch": "e", "offset": 0}),
        "chat",
        Join(1, "g", Position("e", 0), True),
    ),
    (
        "join, every name character, 64 long",
        frame(type="join", id=1, room="AZaz09_-.:" + "x" * 54),
        "chat",
        Join(1, "AZaz09_-.:" + "x" * 54, None, True),
    ),
    (
        "join, unknown fields ignored",
        frame(type="join", id=1, room="g", future={"x": [1, 2]}, v=2),
        "chat",
        Join(1, "g", None, True),
    ),
    ("leave", frame(type="leave", id=2, room="general"), "chat", Leave(2, "general")),
    (
        "publish",
        frame(type="publish", id=3, room="general", body={"text": "hi"}, client_msg_id="7d1e"),
        "chat",
        Publish(3, "general", {"text": "hi"}, "7d1e", len(b'{"text":"hi"}')),
    ),
    (
        "publish, empty body, no client_msg_id",
        frame(type="publish", room="g", body={}),
        "chat",
        Publish(None, "g", {}, None, 2),
    ),
    (
        "publish, client_msg_id null",
        frame(type="publish", id=3, room="g", body={"a": None}, client_msg_id=None),
        "chat",
        Publish(3, "g", {"a": None}, None, len(b'{"a":null}')),
    ),
    (
        "publish, 64-char client_msg_id",
        frame(type="publish", id=3, room="g", body={}, client_msg_id="c" * 64),
        "chat",
        Publish(3, "g", {}, "c" * 64, 2),
    ),
    ("typing", frame(type="typing", room="general"), "chat", Typing(None, "general")),
    ("presence", frame(type="presence", id=4, room="general"), "chat", PresenceQuery(4, "general")),
    (
        "history, all fields",
        frame(type="history", id=5, room="general", before=58, limit=50),
        "chat",
        History(5, "general", 58, 50),
    ),
    ("history, defaults", frame(type="history", room="g"), "chat", History(None, "g", None, 50)),
    (
        "history, bounds",
        frame(type="history", id=5, room="g", before=1, limit=200),
        "chat",
        History(5, "g", 1, 200),
    ),
    (
        "history, limit 1",
        frame(type="history", room="g", limit=1),
        "chat",
        History(None, "g", None, 1),
    ),
    ("ping on chat", frame(type="ping", id=6), "chat", Ping(6)),
    ("ping on live", frame(type="ping", id=6), "live", Ping(6)),
    ("ping, no id", b'{"type":"ping"}', "chat", Ping(None)),
    ("ping, string id", frame(type="ping", id="req-1"), "chat", Ping("req-1")),
    ("ping, empty string id", frame(type="ping", id=""), "chat", Ping("")),
    ("ping, 64-char id", frame(type="ping", id="i" * 64), "chat", Ping("i" * 64)),
    ("ping, id 0", frame(type="ping", id=0), "chat", Ping(0)),
    ("ping, int64 max id", frame(type="ping", id=2**63 - 1), "chat", Ping(2**63 - 1)),
    ("ping, int64 min id", frame(type="ping", id=-(2**63)), "chat", Ping(-(2**63))),
    (
        "subscribe",
        frame(type="subscribe", id=1, feed="items", since={"epoch": "ab", "offset": 9}),
        "live",
        Subscribe(1, "items", Position("ab", 9)),
    ),
    (
        "subscribe, no since",
        frame(type="subscribe", feed="items"),
        "live",
        Subscribe(None, "items", None),
    ),
    ("unsubscribe", frame(type="unsubscribe", id=2, feed="items"), "live", Unsubscribe(2, "items")),
]


@pytest.mark.parametrize(
    ("data", "endpoint", "expected"),
    [pytest.param(*case[1:], id=case[0]) for case in GOOD],
)
def test_good_frames_parse_to_commands(data: bytes, endpoint: Endpoint, expected: Command) -> None:
    command = parse(data, endpoint)
    assert command == expected
    assert type(command) is type(expected)
    assert type(command.id) is type(expected.id)


def test_text_and_bytes_frames_parse_alike() -> None:
    data = frame(type="publish", id="x", room="g", body={"t": "héllo ☃"})
    assert parse(data.decode()) == parse(data)


def test_publish_keeps_the_body_encoding() -> None:
    command = parse(frame(type="publish", room="g", body={"b": [1, 2.5, "é", None, True]}))
    assert isinstance(command, Publish)
    assert command.body_json == orjson.dumps(command.body)
    assert command.body_size == len(command.body_json)


def test_commands_are_frozen() -> None:
    command = Ping(1)
    with pytest.raises(AttributeError):
        command.id = 2  # type: ignore[misc]


# Encoders ----------------------------------------------------------------------------------


def broker_frame(room: str, epoch: str, offset: int, fields: bytes) -> bytes:
    """A `message` event as broker.py says the broker builds it from `message_fields`."""
    head = orjson.dumps({"type": "message", "room": room, "epoch": epoch, "offset": offset})
    return head[:-1] + b"," + fields[1:]


def shape(data: bytes) -> tuple[list[str], dict[str, Any]]:
    value = orjson.loads(data)
    assert isinstance(value, dict)
    return list(value), value


def test_welcome() -> None:
    limits = {"max_body_bytes": 16384, "rate": 20, "burst": 50}
    keys, value = shape(welcome("c0a8", "node-1", ANN, 25, limits))
    assert keys == ["type", "session", "node", "user", "heartbeat", "limits"]
    assert value == {
        "type": "welcome",
        "session": "c0a8",
        "node": "node-1",
        "user": {"id": "42", "name": "ann"},
        "heartbeat": 25,
        "limits": limits,
    }


def test_joined_splices_missed_frames() -> None:
    events = [
        StoredMessage(f"m{n}", "general", "9f2c", n, ANN, {"n": n}, None, "t").event()
        for n in range(42, 58)
    ]
    frames = [orjson.dumps(e) for e in events]
    presence = [{"user": ANN.as_dict(), "connections": 2}]
    data = joined(1, "general", "9f2c", 57, presence, True, frames)
    keys, value = shape(data)
    assert keys == ["type", "id", "room", "epoch", "offset", "presence", "recovered", "missed"]
    assert value == {
        "type": "joined",
        "id": 1,
        "room": "general",
        "epoch": "9f2c",
        "offset": 57,
        "presence": presence,
        "recovered": True,
        "missed": events,
    }
    # Spliced as they are, not re-encoded.
    assert b",".join(frames) in data


def test_joined_without_missed() -> None:
    _, value = shape(joined(None, "g", "e", 0, [], False, []))
    assert value == {
        "type": "joined",
        "id": None,
        "room": "g",
        "epoch": "e",
        "offset": 0,
        "presence": [],
        "recovered": False,
        "missed": [],
    }


def test_joined_with_one_missed_frame() -> None:
    _, value = shape(joined("j", "g", "e", 1, [], True, [b'{"type":"message","offset":1}']))
    assert value["missed"] == [{"type": "message", "offset": 1}]


def test_simple_replies() -> None:
    assert shape(left(2, "general")) == (
        ["type", "id", "room"],
        {"type": "left", "id": 2, "room": "general"},
    )
    assert shape(ack(3, "general", 58, "01J")) == (
        ["type", "id", "room", "offset", "msg_id"],
        {"type": "ack", "id": 3, "room": "general", "offset": 58, "msg_id": "01J"},
    )
    assert shape(pong(6)) == (["type", "id"], {"type": "pong", "id": 6})
    assert shape(pong(None)) == (["type", "id"], {"type": "pong", "id": None})
    assert shape(unsubscribed("u", "items")) == (
        ["type", "id", "feed"],
        {"type": "unsubscribed", "id": "u", "feed": "items"},
    )
    assert shape(error(None, ErrorCode.NOT_JOINED, "join first")) == (
        ["type", "id", "code", "message"],
        {"type": "error", "id": None, "code": "not_joined", "message": "join first"},
    )


def test_events_carry_no_id() -> None:
    assert shape(typing_event("general", ANN)) == (
        ["type", "room", "user"],
        {"type": "typing", "room": "general", "user": {"id": "42", "name": "ann"}},
    )
    member = {"user": ANN.as_dict(), "connections": 1}
    assert shape(presence_diff("general", [member], [])) == (
        ["type", "room", "joins", "leaves"],
        {"type": "presence_diff", "room": "general", "joins": [member], "leaves": []},
    )


def test_presence_reply() -> None:
    members = [{"user": ANN.as_dict(), "connections": 2}]
    assert shape(presence_reply(4, "general", members)) == (
        ["type", "id", "room", "members"],
        {"type": "presence", "id": 4, "room": "general", "members": members},
    )


def test_history_reply_splices_frames_and_encodes_dicts() -> None:
    stored = [
        StoredMessage(f"m{n}", "general", "9f2c", n, ANN, {"n": n}, "c", "t") for n in (1, 2, 3)
    ]
    messages: list[bytes | dict[str, Any]] = [
        orjson.dumps(stored[0].event()),
        stored[1].event(),
        orjson.dumps(stored[2].event()),
    ]
    data = history_reply(5, "general", messages, True)
    keys, value = shape(data)
    assert keys == ["type", "id", "room", "messages", "has_more"]
    assert value == {
        "type": "history",
        "id": 5,
        "room": "general",
        "messages": [m.event() for m in stored],
        "has_more": True,
    }
    assert shape(history_reply(None, "g", [], False))[1] == {
        "type": "history",
        "id": None,
        "room": "g",
        "messages": [],
        "has_more": False,
    }


@pytest.mark.parametrize(
    ("snapshot", "expected"),
    [(b"null", None), (b'{"items":[{"id":1}]}', {"items": [{"id": 1}]}), (b"[1,2]", [1, 2])],
)
def test_subscribed_splices_snapshot_and_missed(snapshot: bytes, expected: object) -> None:
    update = {"type": "update", "feed": "items", "epoch": "e", "offset": 13, "data": {}, "ts": "t"}
    data = subscribed(1, "items", "e", 12, snapshot, True, [orjson.dumps(update)])
    keys, value = shape(data)
    assert keys == [
        "type",
        "id",
        "feed",
        "epoch",
        "offset",
        "snapshot",
        "recovered",
        "missed",
    ]
    assert value == {
        "type": "subscribed",
        "id": 1,
        "feed": "items",
        "epoch": "e",
        "offset": 12,
        "snapshot": expected,
        "recovered": True,
        "missed": [update],
    }


def test_message_fields_make_the_protocol_message_event() -> None:
    body = {"text": "hi"}
    ts = utc_timestamp()
    fields = message_fields("01J", "7d1e", ANN, body, ts)
    keys, value = shape(fields)
    assert keys == ["msg_id", "client_msg_id", "user", "body", "ts"]
    event = broker_frame("general", "9f2c", 58, fields)
    keys, value = shape(event)
    assert keys == [
        "type",
        "room",
        "epoch",
        "offset",
        "msg_id",
        "client_msg_id",
        "user",
        "body",
        "ts",
    ]
    assert value == StoredMessage("01J", "general", "9f2c", 58, ANN, body, "7d1e", ts).event()
    # The pre-encoded body from `Publish.body_json` gives the same bytes.
    assert message_fields("01J", "7d1e", ANN, orjson.dumps(body), ts) == fields
    assert shape(message_fields("01J", None, ANN, {}, ts))[1]["client_msg_id"] is None


def test_update_fields() -> None:
    fields = update_fields({"op": "created", "item": {"id": 1}}, "t")
    assert shape(fields) == (
        ["data", "ts"],
        {"data": {"op": "created", "item": {"id": 1}}, "ts": "t"},
    )
    assert update_fields(b'{"op":"deleted"}', "t") == b'{"data":{"op":"deleted"},"ts":"t"}'


def test_utc_timestamp() -> None:
    assert utc_timestamp(0) == "1970-01-01T00:00:00.000Z"
    ms = int(datetime(2026, 11, 26, 10, 0, 0, 123_000, tzinfo=UTC).timestamp() * 1000)
    assert utc_timestamp(ms) == "2026-11-26T10:00:00.123Z"
    assert utc_timestamp(ms + 876) == "2026-11-26T10:00:00.999Z"
    assert utc_timestamp(ms + 877) == "2026-11-26T10:00:01.000Z"
    now = utc_timestamp()
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", now)
    delta = datetime.now(UTC) - datetime.fromisoformat(now)
    assert abs(delta.total_seconds()) < 5


def test_close_codes_and_reasons() -> None:
    assert {c.name: c.value for c in CloseCode} == {
        "NORMAL": 1000,
        "GOING_AWAY": 1001,
        "POLICY_VIOLATION": 1008,
        "MESSAGE_TOO_BIG": 1009,
        "INTERNAL_ERROR": 1011,
        "TRY_AGAIN_LATER": 1013,
        "UNAUTHORIZED": 4401,
        "FORBIDDEN_ORIGIN": 4403,
        "TOO_SLOW": 4408,
        "TOO_MANY_CONNECTIONS": 4429,
    }
    assert set(CLOSE_REASONS) == set(CloseCode)
    for reason in CLOSE_REASONS.values():
        assert 0 < len(reason.encode()) < 100


def test_error_codes_and_explanations() -> None:
    assert {c.value for c in ErrorCode} == {
        "bad_request",
        "forbidden",
        "not_joined",
        "too_large",
        "rate_limited",
        "unavailable",
        "internal",
    }
    assert set(ERROR_EXPLANATIONS) == set(ErrorCode)
    assert all(ERROR_EXPLANATIONS.values())
    default = ProtocolError(ErrorCode.UNAVAILABLE, id=9)
    assert default.message == ERROR_EXPLANATIONS[ErrorCode.UNAVAILABLE]
    assert orjson.loads(default.frame()) == {
        "type": "error",
        "id": 9,
        "code": "unavailable",
        "message": default.message,
    }


def test_is_valid_name() -> None:
    assert is_valid_name("general")
    assert is_valid_name("a" * 64)
    assert is_valid_name("team-1.ops:alerts_x")
    for bad in ("", "a" * 65, "a b", "a/b", "é", "x\n", 5, None):
        assert not is_valid_name(bad)


# Properties --------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
names = st.text(alphabet="ab_-.:/ é", max_size=66) | st.sampled_from(["general", "items", "a" * 64])
field_values = json_values | names | st.integers(-(2**70), 2**70)
command_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            [
                "join",
                "leave",
                "publish",
                "typing",
                "presence",
                "history",
                "ping",
                "subscribe",
                "unsubscribe",
                "message",
            ]
        )
    },
    optional={
        "id": field_values,
        "room": field_values,
        "feed": field_values,
        "body": field_values,
        "client_msg_id": field_values,
        "since": st.fixed_dictionaries({}, optional={"epoch": field_values, "offset": field_values})
        | field_values,
        "presence_events": field_values,
        "before": field_values,
        "limit": field_values,
    },
)


def parses_or_refuses(data: str | bytes) -> None:
    for endpoint in ("chat", "live"):
        result = outcome(data, endpoint, max_body_bytes=64)
        if isinstance(result, ProtocolError):
            assert isinstance(result.code, ErrorCode)
            assert result.id is None or isinstance(result.id, int | str)
            orjson.loads(result.frame())
        else:
            assert isinstance(result, COMMAND_TYPES)


@settings(database=None, max_examples=300)
@given(json_values)
def test_any_json_value_parses_or_is_refused(value: object) -> None:
    # stdlib json: it writes integers of any size and lone surrogates, which orjson refuses.
    parses_or_refuses(json.dumps(value))


@settings(database=None, max_examples=500)
@given(command_like)
def test_any_command_like_object_parses_or_is_refused(value: dict[str, Any]) -> None:
    parses_or_refuses(json.dumps(value))
    raw = json.dumps(value, ensure_ascii=False)
    parses_or_refuses(raw)
    parses_or_refuses(raw.encode("utf-8", "surrogatepass"))


@settings(database=None, max_examples=300)
@given(st.text() | st.binary())
def test_any_text_or_bytes_parses_or_is_refused(data: str | bytes) -> None:
    parses_or_refuses(data)
