"""/ws/chat end to end: a real `collab serve` process and real WebSocket clients.

One server serves most tests (each test uses rooms of its own); tests of limits start servers
with the settings they need.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from collab.client import CollabClient
from tests.processes import UVICORN_WSPROTO, ServerProcess, server_env
from tests.wsclient import Client, Frame, guest, guest_token

pytestmark = pytest.mark.slow


def room_name() -> str:
    return f"r-{uuid.uuid4().hex[:10]}"


def reply_to(command_id: int) -> Callable[[Frame], bool]:
    return lambda f: f.get("id") == command_id


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("chat")
    node = ServerProcess(
        server_env(folder, {"COLLAB_RATE_LIMIT": "1000", "COLLAB_RATE_BURST": "1000"}),
        folder / "server.log",
    ).start()
    try:
        yield node
    finally:
        node.stop()


def start(tmp_path: Path, command: list[str] | None = None, **settings: str) -> ServerProcess:
    env = {f"COLLAB_{k.upper()}": v for k, v in settings.items()}
    return ServerProcess(
        server_env(tmp_path, env), tmp_path / "server.log", command=command
    ).start()


async def test_welcome_then_join_publish_ack_message(server: ServerProcess) -> None:
    token, user_id = guest(server.url, "ann")
    ann = await Client.connect(server.ws_url, token)
    assert ann.welcome["type"] == "welcome"
    assert ann.welcome["user"] == {"id": user_id, "name": "ann"}
    assert ann.welcome["limits"] == {"max_body_bytes": 16384, "rate": 1000, "burst": 1000}
    assert ann.welcome["heartbeat"] == 25 and isinstance(ann.welcome["heartbeat"], int)
    assert isinstance(ann.welcome["session"], str) and ann.welcome["node"]
    room = room_name()

    joined = await ann.request({"type": "join", "room": room})
    assert joined["type"] == "joined" and joined["room"] == room
    assert joined["offset"] == 0 and joined["recovered"] is False and joined["missed"] == []
    assert joined["presence"] == [{"user": {"id": user_id, "name": "ann"}, "connections": 1}]

    ack = await ann.request(
        {"type": "publish", "room": room, "body": {"text": "hi"}, "client_msg_id": "c1"}
    )
    assert ack["type"] == "ack" and ack["offset"] == 1 and ack["room"] == room
    message = await ann.event("message", room=room)
    assert message == {
        "type": "message",
        "room": room,
        "epoch": joined["epoch"],
        "offset": 1,
        "msg_id": ack["msg_id"],
        "client_msg_id": "c1",
        "user": {"id": user_id, "name": "ann"},
        "body": {"text": "hi"},
        "ts": message["ts"],
    }
    assert message["ts"].endswith("Z")
    await ann.close()


async def test_members_get_every_message_in_offset_order(server: ServerProcess) -> None:
    room = room_name()
    clients = [
        await Client.connect(server.ws_url, guest_token(server.url, f"u{i}")) for i in range(3)
    ]
    for client in clients:
        await client.request({"type": "join", "room": room})

    async def burst(client: Client, n: int) -> None:
        for i in range(n):
            await client.send({"type": "publish", "room": room, "body": {"n": i}})

    await asyncio.gather(*(burst(c, 20) for c in clients))
    for client in clients:
        offsets = [m["offset"] for m in await client.messages(room, 60)]
        assert offsets == list(range(1, 61))
    for client in clients:
        await client.close()


async def test_publish_is_idempotent_by_client_msg_id(server: ServerProcess) -> None:
    room = room_name()
    ann = await Client.connect(server.ws_url, guest_token(server.url))
    await ann.request({"type": "join", "room": room})
    command = {"type": "publish", "room": room, "body": {"text": "once"}, "client_msg_id": "m-1"}
    first = await ann.request(command)
    again = await ann.request(command)
    assert (again["offset"], again["msg_id"]) == (first["offset"], first["msg_id"])
    await ann.event("message", room=room)
    assert await ann.no_frame(lambda f: f.get("type") == "message")
    # Another user's identical client_msg_id is a different message.
    bob = await Client.connect(server.ws_url, guest_token(server.url, "bob"))
    await bob.request({"type": "join", "room": room})
    other = await bob.request(command)
    assert other["offset"] == first["offset"] + 1
    await ann.close()
    await bob.close()


async def test_typing_reaches_others_not_the_sender(server: ServerProcess) -> None:
    room = room_name()
    ann = await Client.connect(server.ws_url, guest_token(server.url, "ann"))
    bob = await Client.connect(server.ws_url, guest_token(server.url, "bob"))
    for c in (ann, bob):
        await c.request({"type": "join", "room": room})
    await ann.send({"type": "typing", "room": room})
    event = await bob.event("typing", room=room)
    assert event["user"] == ann.welcome["user"]
    assert await ann.no_frame(lambda f: f.get("type") == "typing")
    await ann.close()
    await bob.close()


async def test_presence_per_user_not_per_tab(server: ServerProcess) -> None:
    room = room_name()
    ann_token = guest_token(server.url, "ann")
    watcher = await Client.connect(server.ws_url, guest_token(server.url, "watcher"))
    await watcher.request({"type": "join", "room": room})
    tab1 = await Client.connect(server.ws_url, ann_token)
    await tab1.request({"type": "join", "room": room})
    ann_join = {"user": tab1.welcome["user"], "connections": 1}
    # The watcher's own join may come in the same coalesced event, or in one before it (when
    # more than the 100 ms of coalescing passed between the two joins): that one is no news.
    diff = await watcher.wait_for(
        lambda f: f.get("type") == "presence_diff" and ann_join in f["joins"]
    )
    assert diff["leaves"] == []
    watcher.discard(lambda f: f.get("type") == "presence_diff")
    tab2 = await Client.connect(server.ws_url, ann_token)
    joined = await tab2.request({"type": "join", "room": room})
    counts = {m["user"]["id"]: m["connections"] for m in joined["presence"]}
    assert counts[tab1.welcome["user"]["id"]] == 2
    assert await watcher.no_frame(lambda f: f.get("type") == "presence_diff")
    reply = await watcher.request({"type": "presence", "room": room})
    assert {m["user"]["id"]: m["connections"] for m in reply["members"]} == counts

    await tab1.close()
    assert await watcher.no_frame(lambda f: f.get("type") == "presence_diff")
    await tab2.request({"type": "leave", "room": room})
    diff = await watcher.event("presence_diff", room=room)
    assert diff["leaves"][0]["user"] == tab1.welcome["user"] and diff["joins"] == []
    await tab2.close()
    await watcher.close()


async def test_presence_events_can_be_switched_off(server: ServerProcess) -> None:
    room = room_name()
    quiet = await Client.connect(server.ws_url, guest_token(server.url, "quiet"))
    await quiet.request({"type": "join", "room": room, "presence_events": False})
    other = await Client.connect(server.ws_url, guest_token(server.url, "other"))
    await other.request({"type": "join", "room": room})
    await other.request({"type": "publish", "room": room, "body": {}})
    await quiet.event("message", room=room)
    assert await quiet.no_frame(lambda f: f.get("type") == "presence_diff")
    members = (await other.request({"type": "presence", "room": room}))["members"]
    assert len(members) == 2  # it still counts in presence
    await quiet.close()
    await other.close()


async def test_history_command_pages_from_the_store(server: ServerProcess) -> None:
    room = room_name()
    ann = await Client.connect(server.ws_url, guest_token(server.url))
    await ann.request({"type": "join", "room": room})
    for i in range(12):
        await ann.request({"type": "publish", "room": room, "body": {"n": i}})
    latest = await ann.request({"type": "history", "room": room, "limit": 5})
    assert [m["offset"] for m in latest["messages"]] == [8, 9, 10, 11, 12]
    assert latest["has_more"] is True
    older = await ann.request({"type": "history", "room": room, "before": 8, "limit": 200})
    assert [m["offset"] for m in older["messages"]] == list(range(1, 8))
    assert older["has_more"] is False
    assert older["messages"][0]["body"] == {"n": 0}
    # History works on a public room without joining it.
    bob = await Client.connect(server.ws_url, guest_token(server.url, "bob"))
    assert len((await bob.request({"type": "history", "room": room}))["messages"]) == 12
    await ann.close()
    await bob.close()


async def test_reconnect_recovers_exactly_what_was_missed(server: ServerProcess) -> None:
    room = room_name()
    token = guest_token(server.url, "ann")
    ann = await Client.connect(server.ws_url, token)
    first = await ann.request({"type": "join", "room": room})
    # Bob only publishes: the project's own client does (ann speaks the raw protocol).
    bob = await CollabClient(server.ws_url, token=guest_token(server.url, "bob")).connect()
    await bob.join(room, presence_events=False)
    await bob.publish(room, {"n": 0})
    seen = (await ann.event("message", room=room))["offset"]
    await ann.close()
    for i in range(1, 6):
        await bob.publish(room, {"n": i})

    again = await Client.connect(server.ws_url, token)
    since = {"epoch": first["epoch"], "offset": seen}
    joined = await again.request({"type": "join", "room": room, "since": since})
    assert joined["recovered"] is True
    assert [m["offset"] for m in joined["missed"]] == [2, 3, 4, 5, 6]
    assert [m["body"]["n"] for m in joined["missed"]] == [1, 2, 3, 4, 5]
    assert joined["offset"] == 6
    await bob.publish(room, {"n": 6})
    assert (await again.event("message", room=room))["offset"] == 7

    for (since,) in (
        ({"epoch": "not-the-epoch", "offset": 1},),
        ({"epoch": first["epoch"], "offset": 999},),
    ):
        other = await Client.connect(server.ws_url, token)
        reply = await other.request({"type": "join", "room": room, "since": since})
        assert reply["recovered"] is False and reply["missed"] == []
        await other.close()
    await again.close()
    await bob.close()


async def test_errors_are_replies_and_the_connection_lives_on(server: ServerProcess) -> None:
    room = room_name()
    ann = await Client.connect(server.ws_url, guest_token(server.url))
    cases: list[tuple[object, str]] = [
        ("not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('"text"', "bad_request"),
        ("12", "bad_request"),
        ({"type": "nope"}, "bad_request"),
        ({"type": "join"}, "bad_request"),
        ({"type": "join", "room": ""}, "bad_request"),
        ({"type": "join", "room": "x" * 65}, "bad_request"),
        ({"type": "join", "room": "has space"}, "bad_request"),
        ({"type": "join", "room": 5}, "bad_request"),
        (f'{{"type": "join", "room": "{room}", "id": {10**30}}}', "bad_request"),
        ({"type": "history", "room": room, "limit": 500}, "bad_request"),
        ({"type": "publish", "room": room, "body": "text"}, "bad_request"),
        ({"type": "subscribe", "feed": "items"}, "bad_request"),
        ("[" * 10000 + "]" * 10000, "bad_request"),
        ({"type": "publish", "room": room, "body": {"t": "x"}}, "not_joined"),
        ({"type": "typing", "room": room}, "not_joined"),
        ({"type": "publish", "room": room, "body": {"t": "x" * 17000}}, "too_large"),
    ]
    for frame, code in cases:
        await ann.send(frame)  # type: ignore[arg-type]
        error = await ann.wait_for(lambda f: f.get("type") == "error")
        assert error["code"] == code, frame
        assert error["message"]
        assert (await ann.request({"type": "ping"}))["type"] == "pong"
    await ann.send({"type": "nope", "id": "abc"})
    assert (await ann.wait_for(lambda f: f.get("type") == "error"))["id"] == "abc"
    await ann.close()


async def test_private_rooms_refuse_non_members(server: ServerProcess) -> None:
    room = room_name()
    owner_token, _ = guest(server.url, "owner")
    member_token, member_id = guest(server.url, "member")
    created = httpx.post(
        f"{server.url}/rooms",
        json={"name": room, "private": True, "members": [int(member_id)]},
        headers={"Authorization": f"Bearer {owner_token}"},
    )
    assert created.status_code == 201
    stranger = await Client.connect(server.ws_url, guest_token(server.url, "stranger"))
    for command in (
        {"type": "join", "room": room},
        {"type": "presence", "room": room},
        {"type": "history", "room": room},
    ):
        reply = await stranger.request(command)
        assert reply["type"] == "error" and reply["code"] == "forbidden", command
    member = await Client.connect(server.ws_url, member_token)
    assert (await member.request({"type": "join", "room": room}))["type"] == "joined"
    await stranger.close()
    await member.close()


async def test_rest_room_presence_matches_the_hub(server: ServerProcess) -> None:
    room = room_name()
    token = guest_token(server.url, "ann")
    ann = await Client.connect(server.ws_url, token)
    await ann.request({"type": "join", "room": room})
    response = httpx.get(
        f"{server.url}/rooms/{room}/presence", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 200
    assert response.json()["members"] == [{"user": ann.welcome["user"], "connections": 1}]
    await ann.close()


@pytest.mark.parametrize(
    ("token", "header"),
    [(None, None), ("garbage", None), (None, "Bearer garbage"), (None, "Basic x")],
)
async def test_bad_or_missing_token_closes_4401(
    server: ServerProcess, token: str | None, header: str | None
) -> None:
    headers = {"Authorization": header} if header else None
    url = f"{server.ws_url}/ws/chat" + (f"?token={token}" if token else "")
    from websockets.asyncio.client import connect

    async with connect(url, additional_headers=headers) as ws:
        client = Client(ws)
        assert await client.closed_with() == 4401


async def test_authorization_header_is_accepted(server: ServerProcess) -> None:
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {guest_token(server.url)}"}
    async with connect(f"{server.ws_url}/ws/chat", additional_headers=headers) as ws:
        client = Client(ws)
        assert (await client.next_frame())["type"] == "welcome"


async def test_frame_over_the_limit_closes_1009(server: ServerProcess) -> None:
    ann = await Client.connect(server.ws_url, guest_token(server.url), max_size=None)
    await ann.send('{"type":"ping","pad":"' + "x" * 70_000 + '"}')
    assert await ann.closed_with() == 1009


async def test_origin_allow_list(tmp_path: Path) -> None:
    node = start(tmp_path, allowed_origins="https://good.example")
    try:
        token = guest_token(node.url)
        good = await Client.connect(node.ws_url, token, origin="https://good.example")
        assert good.welcome["type"] == "welcome"
        await good.close()
        bare = await Client.connect(node.ws_url, token)  # no Origin: not a browser
        await bare.close()
        from websockets.asyncio.client import connect

        async with connect(
            f"{node.ws_url}/ws/chat?token={token}",
            origin="https://evil.example",  # type: ignore[arg-type]
        ) as ws:
            assert await Client(ws).closed_with() == 4403
    finally:
        node.stop()


async def test_limits_rate_user_connections(tmp_path: Path) -> None:
    node = start(tmp_path, rate_limit="5", rate_burst="5", max_connections_per_user="2")
    try:
        token = guest_token(node.url)
        first = await Client.connect(node.ws_url, token)
        second = await Client.connect(node.ws_url, token)
        from websockets.asyncio.client import connect

        async with connect(f"{node.ws_url}/ws/chat?token={token}") as ws:
            assert await Client(ws).closed_with() == 4429
        await second.close()

        # Over the rate: rate_limited replies; a flood that goes on is closed with 1008.
        for i in range(10):
            await first.send({"type": "ping", "id": i})
        replies = [await first.wait_for(reply_to(i)) for i in range(10)]
        kinds = [r["type"] for r in replies]
        assert kinds.count("pong") >= 5 and "error" in kinds
        limited = next(r for r in replies if r["type"] == "error")
        assert limited["code"] == "rate_limited"
        # A naive rejoin of all the rooms a connection may hold (128), sent at once: the ones
        # past the burst are refused, and the connection stays (it is no flood to send off).
        await asyncio.sleep(1.2)  # the bucket full again
        for i in range(128):
            await first.send({"type": "join", "id": 1000 + i, "room": f"r{i}"})
        joins = [await first.wait_for(reply_to(1000 + i)) for i in range(128)]
        assert {r["type"] for r in joins} == {"joined", "error"}
        assert {r["code"] for r in joins if r["type"] == "error"} == {"rate_limited"}
        await asyncio.sleep(0.5)
        assert (await first.request({"type": "ping"}))["type"] == "pong"
        for i in range(200):
            await first.send({"type": "ping", "id": 100 + i})
        assert await first.closed_with() == 1008
    finally:
        node.stop()


async def test_a_full_node_closes_1013(tmp_path: Path) -> None:
    """Over COLLAB_MAX_CONNECTIONS the node refuses with 1013 (try again later: another node
    may have room), whoever the user is; a place freed is taken again."""
    node = start(tmp_path, max_connections="1")
    try:
        first = await Client.connect(node.ws_url, guest_token(node.url, "ann"))
        from websockets.asyncio.client import connect

        async with connect(f"{node.ws_url}/ws/chat?token={guest_token(node.url, 'bob')}") as ws:
            refused = Client(ws)
            assert await refused.closed_with() == 1013
            assert ws.close_reason == "this node is full; try again later"
        await first.close()
        await asyncio.sleep(0.2)
        again = await Client.connect(node.ws_url, guest_token(node.url, "bob"))
        assert again.welcome["type"] == "welcome"
        await again.close()
    finally:
        node.stop()


async def overflow_a_slow_reader(node: ServerProcess) -> Client:
    """A member that reads nothing while a fast one reads all 600 messages (~9 MB) of their
    room; the slow member, whose outgoing queue has overflowed, is returned unread."""
    room = room_name()
    # A small receive buffer, so the backlog reaches the server's queue within this test
    # rather than filling megabytes of loopback socket buffers first.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", node.port))
    slow = await Client.connect(node.ws_url, guest_token(node.url, "slow"), max_queue=1, sock=sock)
    await slow.request({"type": "join", "room": room})
    fast = await Client.connect(node.ws_url, guest_token(node.url, "fast"))
    await fast.request({"type": "join", "room": room})
    # The fast member must read as fast as a real client: the schema check of every
    # frame (other tests do it) would make it the slow one.
    fast.check_frames = slow.check_frames = False
    body = {"pad": "x" * 15000}
    total = 600  # ~9 MB: more than the kernel's socket buffers hold for a reader that stops
    received = 0

    async def read_fast() -> None:
        nonlocal received
        while received < total:
            frame = await fast.event("message", timeout=20, room=room)
            assert frame["offset"] == received + 1
            received += 1

    reader = asyncio.create_task(read_fast())
    # The publisher stays at most three messages (45 KB, less than the 64 KB queue) ahead
    # of the fast member's reads: a fast reader on a loaded machine is never overflowed,
    # while the slow one, which reads nothing, is sent all ~9 MB.
    for sent in range(total):
        while sent - received >= 3 and not reader.done():
            await asyncio.sleep(0.001)
        await fast.send({"type": "publish", "room": room, "body": body})
    await asyncio.wait_for(reader, 60)
    assert received == total
    return slow


SLOW_READER_SETTINGS = {
    "outgoing_queue_bytes": "65536",
    "rate_limit": "100000",
    "rate_burst": "100000",
    "max_body_bytes": "16384",
}


@pytest.mark.parametrize("command", [None, UVICORN_WSPROTO], ids=["serve", "asgi-send"])
async def test_slow_consumer_is_closed_4408_and_others_keep_up(
    tmp_path: Path, command: list[str] | None
) -> None:
    """Under `collab serve` (direct writes) and another server (ASGI send) alike."""
    node = start(tmp_path, command, **SLOW_READER_SETTINGS)
    try:
        slow = await overflow_a_slow_reader(node)
        # The slow client reads at last: what was sent before the overflow, then 4408.
        assert await slow.closed_with(timeout=30) == 4408
        metrics = httpx.get(f"{node.url}/metrics", timeout=5).text
        assert "collab_connections_closed_too_slow_total 1.0" in metrics
    finally:
        node.stop()


@pytest.mark.parametrize("command", [None, UVICORN_WSPROTO], ids=["serve", "asgi-send"])
async def test_a_slow_consumer_that_never_reads_its_close_is_dropped(
    tmp_path: Path, command: list[str] | None
) -> None:
    """A 4408 stuck behind unread frames must not leave the socket open and silent: its
    client would believe it is in its rooms and never learn to recover."""
    node = start(tmp_path, command, close_timeout="2", **SLOW_READER_SETTINGS)
    try:
        slow = await overflow_a_slow_reader(node)
        deadline = time.monotonic() + 30
        while "collab_connections 1.0" not in httpx.get(f"{node.url}/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the stuck connection was never dropped"
            await asyncio.sleep(0.2)
        # What the kernel still held, then the end of the connection without a close frame.
        assert await slow.closed_with(timeout=30) is None
    finally:
        node.stop()


async def test_sigterm_closes_clients_with_1001(tmp_path: Path) -> None:
    node = start(tmp_path)
    ann = await Client.connect(node.ws_url, guest_token(node.url))
    await ann.request({"type": "join", "room": "general"})
    node.signal(signal.SIGTERM)
    assert await ann.closed_with(timeout=15) == 1001
    # Uvicorn re-raises the signal after a graceful shutdown, so the exit status is -SIGTERM.
    assert node.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in node.log()


async def test_http_upgrade_to_unknown_path_is_refused(server: ServerProcess) -> None:
    from websockets.asyncio.client import connect

    with pytest.raises(InvalidStatus):
        async with connect(f"{server.ws_url}/ws/nowhere"):
            pass
