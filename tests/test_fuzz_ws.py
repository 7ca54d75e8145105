"""Arbitrary frames over one real WebSocket: the server answers each, and never falls over.

Hypothesis generates JSON values of every shape (null, booleans, integers far past 64 bits,
floats with NaN and infinities, text, arrays, objects), well-formed commands of every type
(in a small pool of rooms the connection has joined, so publish and typing are carried out,
not only refused), the same with one field replaced by any JSON value or removed, and frames
that are not JSON at all (text, binary). Each goes to a real `collab serve`, on `/ws/chat`
and on `/ws/live`, over one connection per endpoint that lives through the whole run,
followed by a `ping` whose `pong` marks the end of what the frame caused. Both brokers are
fuzzed: the embedded one, and Redis (with a tiny history window). The property:

- the connection is never closed for it;
- every frame gets exactly one reply (an `error` or the command's normal reply, carrying the
  command's id when it had a valid one, else null), except `typing`, which has none when it
  is carried out;
- no reply is `internal` (a bug) or `unavailable` (nothing here is down);
- `ping` still answers afterwards, the process lives, and its log holds no traceback.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from tests.processes import ServerProcess, server_env
from tests.protocol_schema import check_frame
from tests.services import redis_db_url, require
from tests.wsclient import guest_token

pytestmark = [pytest.mark.slow]

# A database of its own, flushed before and after: 15 is the unit tests', 14 the cluster
# tests', 13 the NGINX tests'.
FUZZ_REDIS_URL = redis_db_url(12)
MAX_FRAME_BYTES = 65536  # the server's default frame limit; past it 1009 is the right answer

REPLIES = {
    "join": "joined",
    "leave": "left",
    "publish": "ack",
    "presence": "presence",
    "history": "history",
    "ping": "pong",
    "subscribe": "subscribed",
    "unsubscribe": "unsubscribed",
    "typing": None,  # no reply when carried out
}
ENDPOINT_COMMANDS = {
    "chat": {"join", "leave", "publish", "typing", "presence", "history", "ping"},
    "live": {"subscribe", "unsubscribe", "ping"},
}

# --- strategies --------------------------------------------------------------------------------

EDGE_INTEGERS = [
    0,
    -1,
    2**31,
    2**53 + 1,
    2**63 - 1,
    2**63,
    -(2**63),
    -(2**63) - 1,
    2**64 - 1,
    2**64,
    10**30,
    -(10**30),
    10**400,  # no float holds it
]
leaves = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(EDGE_INTEGERS)
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats()  # NaN and infinities too: json.dumps writes them, no JSON parser takes them
    | st.text(max_size=40)
)
json_values = st.recursive(
    leaves,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
# Well-formed values of each field. Room and feed names come mostly from a small pool, so
# joins, publishes, typing and leaves of one connection meet in the same rooms.
POOL = ["fuzz", "fuzz-2", "a:b.c_d", "items"]
good_names = st.one_of(
    *[st.sampled_from(POOL)] * 4, st.from_regex(r"[A-Za-z0-9_.:\-]{1,64}", fullmatch=True)
)
good_ids = st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1) | st.text(max_size=64)
good_sinces = st.fixed_dictionaries(
    {
        "epoch": st.text(min_size=1, max_size=64),
        "offset": st.integers(min_value=0, max_value=60) | st.sampled_from([2**63 - 1]),
    }
)
body_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=40)
)
good_bodies = st.dictionaries(
    st.text(max_size=10),
    st.recursive(
        body_leaves,
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=10), children, max_size=4)
        ),
        max_leaves=15,
    ),
    max_size=5,
)
FIELDS: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "join": {"room": good_names},
    "leave": {"room": good_names},
    "publish": {"room": good_names, "body": good_bodies},
    "typing": {"room": good_names},
    "presence": {"room": good_names},
    "history": {"room": good_names},
    "ping": {},
    "subscribe": {"feed": good_names},
    "unsubscribe": {"feed": good_names},
}
OPTIONAL: dict[str, dict[str, st.SearchStrategy[Any]]] = {
    "join": {"since": good_sinces, "presence_events": st.booleans()},
    "publish": {"client_msg_id": st.text(min_size=1, max_size=64)},
    "history": {
        "before": st.integers(min_value=1, max_value=100) | st.sampled_from([2**63 - 1]),
        "limit": st.integers(min_value=1, max_value=200),
    },
    "subscribe": {"since": good_sinces},
}


def well_formed(kind: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries(
        {"type": st.just(kind), **FIELDS[kind]},
        optional={"id": good_ids, "unknown_field": json_values, **OPTIONAL.get(kind, {})},
    )


def well_formed_commands(endpoint: str) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly the endpoint's own commands, sometimes the other endpoint's."""
    own = sorted(ENDPOINT_COMMANDS[endpoint])
    if "publish" in own:
        own += ["publish", "publish"]  # the command with the most to get wrong
    return st.one_of(*[st.sampled_from(own)] * 4, st.sampled_from(list(FIELDS))).flatmap(
        well_formed
    )


@st.composite
def mutated_commands(draw: st.DrawFn, endpoint: str) -> dict[str, Any]:
    """A well-formed command with one field (maybe a missing one) set to any JSON value."""
    command = draw(well_formed_commands(endpoint))
    key = draw(
        st.sampled_from(
            ["id", "type", "room", "feed", "body", "since", "client_msg_id", "before", "limit"]
        )
        | st.text(max_size=10)
    )
    if draw(st.booleans()):
        command.pop(key, None)
    else:
        command[key] = draw(
            json_values
            | st.sampled_from(EDGE_INTEGERS)
            | st.builds(lambda i: {"epoch": "e", "offset": i}, st.sampled_from(EDGE_INTEGERS))
        )
    return command


@dataclass(frozen=True)
class Frame:
    """What is sent, and the JSON value it encodes (None when it is not meant as JSON)."""

    payload: str | bytes
    value: Any = None
    is_json: bool = False


def encoded(value: Any, ascii_only: bool) -> Frame:
    return Frame(json.dumps(value, ensure_ascii=ascii_only), value, True)


def frames(endpoint: str) -> st.SearchStrategy[Frame]:
    return st.one_of(
        st.builds(encoded, well_formed_commands(endpoint), st.booleans()),
        st.builds(encoded, well_formed_commands(endpoint), st.booleans()),
        st.builds(encoded, mutated_commands(endpoint), st.booleans()),
        st.builds(encoded, json_values, st.booleans()),
        st.builds(Frame, st.text(max_size=60)),  # text that is rarely JSON
        st.builds(Frame, st.binary(max_size=60)),  # binary frames, often not UTF-8
    )


# --- the connection ----------------------------------------------------------------------------


@dataclass
class Session:
    server: ServerProcess
    endpoint: str
    token: str
    ws: ClientConnection | None = None
    closes: list[str] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def connection(self) -> ClientConnection:
        if self.ws is None:
            self.ws = self.stack.enter_context(
                connect(
                    f"{self.server.ws_url}/ws/{self.endpoint}?token={self.token}",
                    compression=None,
                    max_size=None,
                    # Its keepalive pings draw from `random` in a background thread, which
                    # Hypothesis takes for a strategy using global randomness.
                    ping_interval=None,
                )
            )
            welcome = orjson.loads(self.ws.recv(timeout=10))
            assert welcome["type"] == "welcome", welcome
            check_frame(f"/ws/{self.endpoint}", welcome)
            if self.endpoint == "chat":
                # Members of the pool's rooms from the start, so that publish and typing are
                # mostly carried out rather than refused (until a generated leave).
                for room in POOL:
                    replies = self.exchange(Frame(json.dumps({"type": "join", "room": room})))
                    assert [r["type"] for r in replies] == ["joined"], replies
        return self.ws

    def recv(self, timeout: float) -> dict[str, Any]:
        ws = self.connection()
        try:
            raw = ws.recv(timeout=timeout)
        except ConnectionClosed as exc:
            # Reconnect for the examples after this one; this one fails.
            self.ws = None
            code = exc.rcvd.code if exc.rcvd else None
            self.closes.append(f"closed with {code}")
            pytest.fail(f"the server closed the connection ({code})")
        frame: dict[str, Any] = orjson.loads(raw)  # every server frame is a JSON object
        assert isinstance(frame, dict), frame
        check_frame(f"/ws/{self.endpoint}", frame)  # and fits the AsyncAPI document
        return frame

    def exchange(self, frame: Frame) -> list[dict[str, Any]]:
        """Send `frame`, then a ping; the replies that came before the pong (and, for a
        publish, its ack, which is sent once the message is stored)."""
        ws = self.connection()
        ws.send(frame.payload)
        sentinel = f"sentinel-{uuid.uuid4().hex}"
        ws.send(json.dumps({"type": "ping", "id": sentinel}))
        replies = []
        while True:
            reply = self.recv(timeout=10)
            if reply.get("id") == sentinel and reply.get("type") == "pong":
                break
            if "id" in reply:  # events carry no id
                replies.append(reply)
        if not replies and server_kind(frame) == "publish":
            deadline = time.monotonic() + 10
            while not replies and time.monotonic() < deadline:
                reply = self.recv(timeout=max(0.01, deadline - time.monotonic()))
                if "id" in reply:
                    replies.append(reply)
        return replies


_NOT_JSON = object()


def server_decoded(frame: Frame) -> Any:
    """The frame as the server's JSON parser reads it, or a marker when it cannot."""
    try:
        return orjson.loads(frame.payload)
    except orjson.JSONDecodeError:
        return _NOT_JSON


def server_kind(frame: Frame) -> str | None:
    value = server_decoded(frame)
    if isinstance(value, dict) and isinstance(value.get("type"), str):
        return str(value["type"])
    return None


def expected_id(frame: Frame) -> object:
    """The id a reply must echo: the command's, when valid (PROTOCOL.md), else null."""
    value = server_decoded(frame)
    if not isinstance(value, dict):
        return None
    command_id = value.get("id")
    if type(command_id) is str and len(command_id) <= 64:
        return command_id
    if type(command_id) is int and -(2**63) <= command_id <= 2**63 - 1:
        return command_id
    return None


def flush(url: str) -> None:
    client = redis.Redis.from_url(url, socket_timeout=2)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture(scope="module", params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerProcess]:
    """One server per broker: the embedded one, and the Redis one (with a window of 3, so
    recovery also goes to the database)."""
    settings = {"COLLAB_RATE_LIMIT": "100000", "COLLAB_RATE_BURST": "100000"}
    if request.param == "redis":
        require(FUZZ_REDIS_URL, 6379, "Redis")
        flush(FUZZ_REDIS_URL)  # the pool's rooms start empty in every run
        settings |= {"COLLAB_BROKER_URL": FUZZ_REDIS_URL, "COLLAB_HISTORY_WINDOW": "3"}
    folder = tmp_path_factory.mktemp(f"fuzz-ws-{request.param}")
    node = ServerProcess(server_env(folder, settings), folder / "server.log").start()
    try:
        yield node
    finally:
        node.stop()
        if request.param == "redis":
            flush(FUZZ_REDIS_URL)


@pytest.fixture(scope="module")
def token(server: ServerProcess) -> str:
    return guest_token(server.url, "fuzzer")


@pytest.fixture(scope="module")
def chat(server: ServerProcess, token: str) -> Iterator[Session]:
    state = Session(server, "chat", token)
    with state.stack:  # closes every connection the session opened
        yield state


@pytest.fixture(scope="module")
def live(server: ServerProcess, token: str) -> Iterator[Session]:
    state = Session(server, "live", token)
    with state.stack:
        yield state


def check_replies(session: Session, frame: Frame, replies: list[dict[str, Any]]) -> None:
    kind = server_kind(frame)
    known = kind is not None and kind in ENDPOINT_COMMANDS[session.endpoint]
    if kind == "typing" and known:
        assert len(replies) <= 1, replies  # none when carried out
    else:
        assert len(replies) == 1, replies
    for reply in replies:
        assert reply["id"] == expected_id(frame), reply
        if reply["type"] == "error":
            assert reply["code"] not in ("internal", "unavailable"), reply
            assert isinstance(reply["message"], str) and reply["message"]
            if not known:
                assert reply["code"] == "bad_request", reply
        else:
            assert known and reply["type"] == REPLIES[kind], reply  # type: ignore[index]


FUZZ = settings(
    max_examples=200,
    deadline=None,
    database=None,
    # The only function-scoped fixture is conftest's autouse cleanup of async clients; the
    # connection under test is module-scoped on purpose (one socket for every example).
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def fuzz_once(session: Session, frame: Frame) -> None:
    if len(frame.payload) > MAX_FRAME_BYTES // 2:
        return  # a frame over the limit is closed with 1009 by design (tested elsewhere)
    check_replies(session, frame, session.exchange(frame))


@FUZZ
@given(frame=frames("chat"))
def test_chat_answers_any_frame_and_the_connection_lives(chat: Session, frame: Frame) -> None:
    fuzz_once(chat, frame)


@FUZZ
@given(frame=frames("live"))
def test_live_answers_any_frame_and_the_connection_lives(live: Session, frame: Frame) -> None:
    fuzz_once(live, frame)


def test_after_the_fuzzing_the_server_is_whole(
    chat: Session, live: Session, server: ServerProcess
) -> None:
    """Runs after the property tests (module order)."""
    for session in (chat, live):
        reply = session.exchange(Frame(json.dumps({"type": "ping", "id": "last"})))
        assert reply == [{"type": "pong", "id": "last"}]
        assert session.closes == []
    assert server.process is not None and server.process.poll() is None
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200
    log = Path(server.log_path).read_text(errors="replace")
    assert "Traceback" not in log, log[-5000:]
