"""Many nodes through Redis, end to end: real `collab serve` processes sharing one Redis and
one database, and real WebSocket clients spread over them.

What a user of a cluster relies on, each shown with the nodes as separate processes:

- members on every node get every message of a room once, in offset order, whichever node
  each publisher is on, and so does a member who joins while they flow;
- presence (and typing) is the cluster's, per user and not per tab; live feeds too;
- a node that dies (SIGKILL) takes its users out of presence within the presence timeout,
  and the leave is announced on the nodes that live on; a node that only stalled brings
  its users back when it goes on; a node shut down gracefully announces their leave at once
  and its clients recover on another node;
- a client that reconnects to another node recovers exactly what it missed, from the
  broker's window or, past it, from the durable store; a retried publish is not doubled;
- Redis going away answers `unavailable` (never an ack), `/readyz` says so, and the nodes
  come back by themselves when it returns (or when it first appears), without losing
  anything acknowledged and without announcing connected users as gone.

The module's three nodes use a Redis database of their own (14, not the 15 that the unit
tests flush) and rooms named after this run, whose keys are deleted at the end. The tests
that kill a node or Redis start nodes (and a redis-server) of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from tests.helpers import eventually
from tests.processes import RedisServer, ServerProcess, server_env
from tests.processes import require_redis_server as require_redis_program
from tests.services import redis_db_url, require
from tests.wsclient import Client, Frame, guest, guest_token

pytestmark = [pytest.mark.slow, pytest.mark.redis]

RUN = uuid.uuid4().hex[:8]  # every room of this run carries it, so its keys can be found
PRESENCE_TIMEOUT = 2.0
HISTORY_WINDOW = 5


CLUSTER_REDIS_URL = redis_db_url(14)


def room_name() -> str:
    return f"cl-{RUN}-{uuid.uuid4().hex[:8]}"


def start_nodes(
    folder: Path,
    sqlite_template: Path,
    broker_url: str,
    names: Sequence[str],
    **settings: str,
) -> list[ServerProcess]:
    """Nodes sharing one broker, one SQLite file and one secret, started in parallel."""
    database = folder / "cluster.db"
    shutil.copy(sqlite_template, database)  # migrated once; no node races to migrate
    common = {
        "COLLAB_BROKER_URL": broker_url,
        "COLLAB_DATABASE_URL": f"sqlite+aiosqlite:///{database}",
        "COLLAB_AUTO_MIGRATE": "false",
        "COLLAB_RATE_LIMIT": "100000",
        "COLLAB_RATE_BURST": "100000",
        "COLLAB_PRESENCE_TIMEOUT": str(PRESENCE_TIMEOUT),
    }
    common.update({f"COLLAB_{key.upper()}": value for key, value in settings.items()})
    nodes = [
        ServerProcess(
            server_env(folder, {**common, "COLLAB_NODE_ID": f"{name}-{RUN}"}),
            folder / f"{name}.log",
        )
        for name in names
    ]
    with ThreadPoolExecutor(len(nodes)) as pool:
        started = [pool.submit(node.start) for node in nodes]
        failures = [error for future in started if (error := future.exception()) is not None]
    if failures:
        stop_nodes(nodes)
        raise failures[0]
    return nodes


def stop_nodes(nodes: Sequence[ServerProcess]) -> None:
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        list(pool.map(lambda node: node.stop(), nodes))


def forget_run_keys(url: str) -> None:
    """Delete what this run's rooms left in a shared Redis database."""
    with contextlib.suppress(redis.RedisError):
        client = redis.Redis.from_url(url, socket_timeout=2)
        try:
            keys = list(client.scan_iter(match=f"*{RUN}*", count=1000))
            if keys:
                client.delete(*keys)
            rooms: set[bytes] = client.smembers("collab:presence:rooms")  # type: ignore[assignment]
            ours = [room for room in rooms if RUN.encode() in room]
            if ours:
                client.srem("collab:presence:rooms", *ours)
        finally:
            client.close()


@pytest.fixture(scope="module", autouse=True)
def _forget_this_runs_keys() -> Iterator[None]:
    yield
    forget_run_keys(CLUSTER_REDIS_URL)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, sqlite_template: Path
) -> Iterator[list[ServerProcess]]:
    """Three nodes on one Redis and one database, with a small history window."""
    require(CLUSTER_REDIS_URL, 6379, "Redis")
    folder = tmp_path_factory.mktemp("cluster")
    nodes = start_nodes(
        folder,
        sqlite_template,
        CLUSTER_REDIS_URL,
        ["a", "b", "c"],
        history_window=str(HISTORY_WINDOW),
    )
    try:
        yield nodes
    finally:
        stop_nodes(nodes)


async def join_on(node: ServerProcess, token: str, room: str, **join: Any) -> tuple[Client, Frame]:
    """A new connection to `node` that has joined `room`, and its `joined` reply."""
    client = await Client.connect(node.ws_url, token)
    reply = await client.request({"type": "join", "room": room, **join})
    assert reply["type"] == "joined", reply
    return client, reply


async def joined_client(node: ServerProcess, token: str, room: str) -> Client:
    return (await join_on(node, token, room))[0]


async def presence_of(client: Client, room: str) -> dict[str, int]:
    reply = await client.request({"type": "presence", "room": room})
    assert reply["type"] == "presence", reply
    return {m["user"]["id"]: m["connections"] for m in reply["members"]}


def reply_to(command_id: str) -> Callable[[Frame], bool]:
    return lambda f: f.get("id") == command_id


def names_in(diff: Frame, key: str) -> set[str]:
    return {entry["user"]["id"] for entry in diff[key]}


def diff_naming(user_id: str, key: str) -> Callable[[Frame], bool]:
    return lambda f: f.get("type") == "presence_diff" and user_id in names_in(f, key)


def diff_about(user_id: str) -> Callable[[Frame], bool]:
    return lambda f: (
        f.get("type") == "presence_diff" and user_id in names_in(f, "joins") | names_in(f, "leaves")
    )


# --- 1. order across nodes ---------------------------------------------------------------------


@pytest.mark.parametrize("node_count", [2, 3])
async def test_members_on_every_node_get_every_message_in_offset_order(
    cluster: list[ServerProcess], node_count: int
) -> None:
    nodes = cluster[:node_count]
    room = room_name()
    listeners = [
        await joined_client(node, guest_token(node.url, f"listener{i}"), room)
        for i, node in enumerate(nodes)
    ]
    # Three publishers on two nodes (a, b, a), sending at once without waiting for acks.
    publishers = [
        await joined_client(nodes[i % 2], guest_token(nodes[i % 2].url, f"pub{i}"), room)
        for i in range(3)
    ]
    per_publisher, total = 50, 150
    # And one who joins on the last node while the messages flow.
    late_token = guest_token(nodes[-1].url, "late")
    flowing = asyncio.Event()

    async def join_late() -> tuple[Client, Frame]:
        await flowing.wait()
        return await join_on(nodes[-1], late_token, room)

    async def send_all(index: int, client: Client) -> dict[int, Frame]:
        ids = [f"p{index}-{n}" for n in range(per_publisher)]
        for n, command_id in enumerate(ids):
            if n == per_publisher // 3:
                flowing.set()
            await client.send(
                {
                    "type": "publish",
                    "id": command_id,
                    "room": room,
                    "body": {"p": index, "n": n},
                    "client_msg_id": command_id,
                }
            )
            if n % 5 == 0:
                await asyncio.sleep(0)  # let the other publishers in between
        acks = {}
        for n, command_id in enumerate(ids):
            reply = await client.wait_for(reply_to(command_id), timeout=20)
            assert reply["type"] == "ack", reply
            acks[n] = reply
        return acks

    late_join = asyncio.ensure_future(join_late())
    acks = await asyncio.gather(*(send_all(i, c) for i, c in enumerate(publishers)))
    acked = {ack["offset"]: ack["msg_id"] for per in acks for ack in per.values()}
    assert sorted(acked) == list(range(1, total + 1)), "acks name every offset once"
    # The late joiner gets exactly what follows the offset its `joined` named.
    late, joined = await late_join
    after = [m["offset"] for m in await late.messages(room, total - joined["offset"], timeout=20)]
    assert after == list(range(joined["offset"] + 1, total + 1))

    reference: list[Frame] | None = None
    for member in listeners + publishers:
        messages = await member.messages(room, total, timeout=20)
        assert [m["offset"] for m in messages] == list(range(1, total + 1))
        assert len({m["epoch"] for m in messages}) == 1
        assert {m["offset"]: m["msg_id"] for m in messages} == acked
        for index in range(3):  # each publisher's messages in the order it sent them
            sent = [m["body"]["n"] for m in messages if m["body"]["p"] == index]
            assert sent == list(range(per_publisher))
        if reference is None:
            reference = messages
        assert messages == reference, "every node delivers the same frames"
    # No duplicate comes late: one more message is the next frame every member gets.
    await publishers[0].request({"type": "publish", "room": room, "body": {"last": True}})
    for member in [*listeners, *publishers, late]:
        assert (await member.event("message", room=room))["offset"] == total + 1


# --- 2. presence spans nodes -------------------------------------------------------------------


async def test_presence_spans_nodes_per_user_not_per_tab(cluster: list[ServerProcess]) -> None:
    a, b, c = cluster
    room = room_name()
    ann_token, ann_id = guest(a.url, "ann")
    bob_token, bob_id = guest(b.url, "bob")

    ann_tab1, joined = await join_on(a, ann_token, room)
    assert joined["presence"] == [{"user": {"id": ann_id, "name": "ann"}, "connections": 1}]
    bob, joined = await join_on(b, bob_token, room)
    assert joined["presence"] == [  # ordered by user id, as strings
        {"user": {"id": user_id, "name": name}, "connections": 1}
        for user_id, name in sorted([(ann_id, "ann"), (bob_id, "bob")])
    ]
    # Bob's join, decided on node b, reaches ann on node a.
    diff = await ann_tab1.wait_for(diff_naming(bob_id, "joins"))
    assert diff["room"] == room and bob_id not in names_in(diff, "leaves")

    # A second tab of ann, on a third node: no new join for anyone, two connections.
    ann_tab2, joined = await join_on(c, ann_token, room)
    assert {m["user"]["id"]: m["connections"] for m in joined["presence"]} == {
        ann_id: 2,
        bob_id: 1,
    }
    assert await presence_of(bob, room) == {ann_id: 2, bob_id: 1}
    async with httpx.AsyncClient() as http:
        rest = await http.get(
            f"{a.url}/rooms/{room}/presence", headers={"Authorization": f"Bearer {bob_token}"}
        )
    assert rest.status_code == 200
    assert {m["user"]["id"]: m["connections"] for m in rest.json()["members"]} == {
        ann_id: 2,
        bob_id: 1,
    }

    # Typing crosses nodes too: from ann on a to bob on b, never to ann's other tab.
    await ann_tab1.send({"type": "typing", "room": room})
    typing = await bob.event("typing", room=room)
    assert typing["user"] == {"id": ann_id, "name": "ann"}
    assert await ann_tab2.no_frame(lambda f: f.get("type") == "typing", wait=0.3)

    # One tab closes: ann is still there, nobody hears of it.
    await ann_tab1.close()

    async def ann_down_to_one() -> bool:
        return (await presence_of(bob, room)).get(ann_id) == 1

    await eventually(ann_down_to_one, 5, "ann's closed tab leaves the count")
    # Her last tab leaves (on node c): bob, on node b, hears it.
    assert (await ann_tab2.request({"type": "leave", "room": room}))["type"] == "left"
    leave = await bob.wait_for(diff_naming(ann_id, "leaves"))
    assert ann_id not in names_in(leave, "joins")
    assert leave["leaves"] == [{"user": {"id": ann_id, "name": "ann"}, "connections": 0}]
    # Per user, not per tab: besides that leave, bob heard at most her first tab's join (it
    # may have been announced before his own join took effect), whatever her tabs did.
    about_ann = [
        "join" if ann_id in names_in(f, "joins") else "leave"
        for f in bob.frames
        if diff_about(ann_id)(f)
    ]
    assert about_ann in (["leave"], ["join", "leave"]), about_ann
    assert await presence_of(bob, room) == {bob_id: 1}


async def test_live_feed_changes_reach_dashboards_on_every_node(
    cluster: list[ServerProcess],
) -> None:
    """/ws/live across nodes: an item created through the REST API of one node is an update
    for dashboards on the others, and a dashboard that reconnects elsewhere recovers it."""
    a, b, c = cluster
    token = guest_token(a.url, "dash")
    dashboards = [await Client.connect(node.ws_url, token, path="/ws/live") for node in (b, c)]
    subscribed = [await d.request({"type": "subscribe", "feed": "items"}) for d in dashboards]
    assert {s["type"] for s in subscribed} == {"subscribed"}
    title = room_name()
    async with httpx.AsyncClient() as http:
        created = await http.post(
            f"{a.url}/items",
            json={"title": title, "data": {"k": 1}},
            headers={"Authorization": f"Bearer {token}"},
        )
    assert created.status_code == 201, created.text
    item = created.json()
    offsets = set()
    for dashboard in dashboards:
        update = await dashboard.wait_for(
            lambda f: f.get("type") == "update" and f["data"]["item"]["title"] == title
        )
        assert update["data"] == {"op": "created", "item": item}
        offsets.add((update["epoch"], update["offset"]))
    assert len(offsets) == 1, "one publication, the same position on every node"
    ((epoch, offset),) = offsets
    again = await Client.connect(a.ws_url, token, path="/ws/live")
    reply = await again.request(
        {"type": "subscribe", "feed": "items", "since": {"epoch": epoch, "offset": offset - 1}}
    )
    assert reply["recovered"] is True
    assert [m["data"] for m in reply["missed"]] == [{"op": "created", "item": item}]
    assert item in reply["snapshot"]


# --- 3. a node dies ------------------------------------------------------------------------------


@pytest.fixture
def two_nodes(tmp_path: Path, sqlite_template: Path) -> Iterator[list[ServerProcess]]:
    require(CLUSTER_REDIS_URL, 6379, "Redis")
    nodes = start_nodes(tmp_path, sqlite_template, CLUSTER_REDIS_URL, ["k1", "k2"])
    try:
        yield nodes
    finally:
        stop_nodes(nodes)


async def test_killed_node_users_leave_presence_within_the_timeout(
    two_nodes: list[ServerProcess],
) -> None:
    doomed, survivor = two_nodes
    room = room_name()
    ann_token, ann_id = guest(doomed.url, "ann")  # only on the node that dies
    carol_token, carol_id = guest(doomed.url, "carol")  # a tab on each node
    bob_token, bob_id = guest(survivor.url, "bob")  # watches from the node that lives

    bob = await joined_client(survivor, bob_token, room)
    await joined_client(doomed, ann_token, room)
    await joined_client(doomed, carol_token, room)
    carol_tab2 = await joined_client(survivor, carol_token, room)
    assert await presence_of(bob, room) == {ann_id: 1, bob_id: 1, carol_id: 2}
    await bob.wait_for(diff_naming(ann_id, "joins"))

    doomed.kill()  # SIGKILL, by its PID: no leave is ever sent by that node
    killed_at = time.monotonic()
    leave = await bob.wait_for(diff_naming(ann_id, "leaves"), timeout=PRESENCE_TIMEOUT + 4)
    took = time.monotonic() - killed_at
    # An entry expires `timeout` after its last refresh, and the sweep that notices runs every
    # third of the timeout; then the leave waits up to 0.1 s to be coalesced. (Measured here:
    # 2.1 to 2.5 s for a timeout of 2 s.)
    assert took < PRESENCE_TIMEOUT * 4 / 3 + 0.5, took
    assert leave["room"] == room and ann_id not in names_in(leave, "joins")
    assert carol_id not in names_in(leave, "leaves"), "carol still has a tab on the survivor"
    # Carol's tab on the dead node goes too, and only that tab: in the same sweep, or in the
    # next if the dead node's last refresh of it came a moment after ann's.
    deadline = time.monotonic() + PRESENCE_TIMEOUT / 3 + 2
    while (seen := await presence_of(bob, room)) != {bob_id: 1, carol_id: 1}:
        assert time.monotonic() < deadline, seen
        await asyncio.sleep(0.1)
    assert await presence_of(carol_tab2, room) == {bob_id: 1, carol_id: 1}
    assert await bob.no_frame(diff_naming(carol_id, "leaves"), wait=PRESENCE_TIMEOUT / 2)
    # The survivor serves on.
    ack = await bob.request({"type": "publish", "room": room, "body": {"after": "kill"}})
    assert ack["type"] == "ack", ack


async def test_stalled_node_users_come_back_to_presence(two_nodes: list[ServerProcess]) -> None:
    """A node that stops answering for longer than the timeout (a stalled event loop, a long
    pause) looks dead: its users are announced as gone. When it goes on, with their sockets
    still open, they must come back, or they would stay out of presence while connected."""
    stalled, other = two_nodes
    room = room_name()
    ann_token, ann_id = guest(stalled.url, "ann")
    bob_token, bob_id = guest(other.url, "bob")
    bob = await joined_client(other, bob_token, room)
    ann = await joined_client(stalled, ann_token, room)
    await bob.wait_for(diff_naming(ann_id, "joins"))

    stalled.signal(signal.SIGSTOP)  # by its PID
    try:
        await bob.wait_for(diff_naming(ann_id, "leaves"), timeout=PRESENCE_TIMEOUT + 4)
        assert await presence_of(bob, room) == {bob_id: 1}
    finally:
        stalled.signal(signal.SIGCONT)
    back = await bob.wait_for(diff_naming(ann_id, "joins"), timeout=PRESENCE_TIMEOUT + 2)
    assert ann_id not in names_in(back, "leaves")
    assert await presence_of(bob, room) == {ann_id: 1, bob_id: 1}
    assert await presence_of(ann, room) == {ann_id: 1, bob_id: 1}
    ack = await ann.request({"type": "publish", "room": room, "body": {"still": "here"}})
    assert ack["type"] == "ack", ack
    assert (await bob.event("message", room=room))["offset"] == ack["offset"]


async def test_graceful_shutdown_hands_clients_to_another_node(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """A rolling restart: SIGTERM closes the node's clients with 1001 and announces their
    leave at once (with a presence timeout of 30 s, expiry cannot be what announces it);
    they reconnect to another node and recover what was published meanwhile."""
    require(CLUSTER_REDIS_URL, 6379, "Redis")
    going, staying = start_nodes(
        tmp_path, sqlite_template, CLUSTER_REDIS_URL, ["g1", "g2"], presence_timeout="30"
    )
    try:
        room = room_name()
        ann_token, ann_id = guest(going.url, "ann")
        bob = await joined_client(staying, guest_token(staying.url, "bob"), room)
        ann, joined = await join_on(going, ann_token, room)
        await bob.wait_for(diff_naming(ann_id, "joins"))
        ack = await bob.request({"type": "publish", "room": room, "body": {"n": 1}})
        seen = await ann.event("message", room=room)
        assert seen["offset"] == ack["offset"] == 1

        going.signal(signal.SIGTERM)
        assert await ann.closed_with(timeout=10) == 1001
        leave = await bob.wait_for(diff_naming(ann_id, "leaves"), timeout=5)
        assert ann_id not in names_in(leave, "joins")
        for n in (2, 3):
            assert (await bob.request({"type": "publish", "room": room, "body": {"n": n}}))[
                "type"
            ] == "ack"
        ann, rejoined = await join_on(
            staying, ann_token, room, since={"epoch": joined["epoch"], "offset": 1}
        )
        assert rejoined["recovered"] is True
        assert [m["body"]["n"] for m in rejoined["missed"]] == [2, 3]
        assert going.stop() in (0, -signal.SIGTERM)
    finally:
        stop_nodes([going, staying])


# --- 4. recovery on another node ------------------------------------------------------------------


async def test_reconnect_to_another_node_recovers_exactly_what_was_missed(
    cluster: list[ServerProcess],
) -> None:
    a, b, c = cluster
    room = room_name()
    ann_token = guest_token(a.url, "ann")
    bob = await joined_client(b, guest_token(b.url, "bob"), room)
    sent: dict[int, Frame] = {}  # offset -> the message event as a live member got it

    async def publish(count: int) -> None:
        for _ in range(count):
            n = len(sent) + 1
            ack = await bob.request(
                {"type": "publish", "room": room, "body": {"n": n}, "client_msg_id": f"m{n}"}
            )
            assert ack["type"] == "ack", ack
            message = await bob.event("message", room=room)
            assert message["offset"] == ack["offset"] == n
            sent[n] = message

    ann, joined = await join_on(a, ann_token, room)
    epoch = joined["epoch"]
    await publish(1)
    assert (await ann.event("message", room=room)) == sent[1]
    await ann.close()

    # Missed three: within the broker's window (5). Recovered on node b.
    await publish(3)
    ann, joined = await join_on(b, ann_token, room, since={"epoch": epoch, "offset": 1})
    assert joined["recovered"] is True and joined["epoch"] == epoch and joined["offset"] == 4
    assert joined["missed"] == [sent[2], sent[3], sent[4]]
    await ann.close()

    # Missed twelve: the window holds the last five only, the rest comes from the database.
    await publish(12)
    ann, joined = await join_on(c, ann_token, room, since={"epoch": epoch, "offset": 4})
    assert joined["recovered"] is True and joined["offset"] == 16
    assert [m["offset"] for m in joined["missed"]] == list(range(5, 17))
    assert joined["missed"] == [sent[n] for n in range(5, 17)]
    # Live delivery goes on from there, nothing twice.
    await publish(1)
    assert (await ann.event("message", room=room)) == sent[17]
    await ann.close()

    # Missed everything: all from the database.
    ann, joined = await join_on(a, ann_token, room, since={"epoch": epoch, "offset": 0})
    assert joined["recovered"] is True
    assert joined["missed"] == [sent[n] for n in range(1, 18)]
    await ann.close()

    # A publish retried after reconnecting to another node (same client_msg_id) is acked
    # again with the first ack, and nobody gets it twice.
    ann, _ = await join_on(a, ann_token, room)
    command = {"type": "publish", "room": room, "body": {"n": "retry"}, "client_msg_id": "r1"}
    first = await ann.request(command)
    await ann.close()
    ann, _ = await join_on(c, ann_token, room)
    again = await ann.request(command)
    assert (again["type"], again["offset"], again["msg_id"]) == (
        "ack",
        first["offset"],
        first["msg_id"],
    )
    assert (await bob.event("message", room=room))["msg_id"] == first["msg_id"]
    assert await bob.no_frame(lambda f: f.get("type") == "message", wait=0.3)
    await ann.close()

    # Nothing missed; and positions that cannot be continued.
    for since, recovered in (
        ({"epoch": epoch, "offset": 18}, True),
        ({"epoch": epoch, "offset": 19}, False),
        ({"epoch": "another-epoch", "offset": 3}, False),
    ):
        other, joined = await join_on(c, ann_token, room, since=since)
        assert (joined["recovered"], joined["missed"]) == (recovered, []), since
        await other.close()


# --- 5. Redis restarted under running nodes -------------------------------------------------------


def require_redis_server() -> None:
    require(CLUSTER_REDIS_URL, 6379, "Redis")
    require_redis_program()


@pytest.fixture(params=["data-lost", "data-kept"])
def own_redis(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    require_redis_server()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(workdir, persistent=request.param == "data-kept")
    server.start()
    try:
        yield server
    finally:
        server.kill()


async def readiness(http: httpx.AsyncClient, node: ServerProcess) -> tuple[int, dict[str, Any]]:
    response = await http.get(f"{node.url}/readyz", timeout=5)
    return response.status_code, response.json()


def stored_msg_ids(database: Path, room: str) -> set[str]:
    """What the durable store holds for a room, every epoch (REST shows the newest only)."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return {row[0] for row in db.execute("SELECT msg_id FROM messages WHERE room = ?", (room,))}


async def test_redis_restart_under_running_nodes(
    own_redis: RedisServer, tmp_path: Path, sqlite_template: Path
) -> None:
    a, b = start_nodes(tmp_path, sqlite_template, own_redis.url, ["ra", "rb"])
    try:
        await redis_restart_scenario(own_redis, a, b, tmp_path / "cluster.db")
    finally:
        stop_nodes([a, b])


async def redis_restart_scenario(
    own_redis: RedisServer, a: ServerProcess, b: ServerProcess, database: Path
) -> None:
    room = room_name()
    ann_token, ann_id = guest(a.url, "ann")
    bob_token, bob_id = guest(b.url, "bob")
    acked: dict[str, Frame] = {}  # client_msg_id -> ack
    refused: set[str] = set()  # client_msg_ids that were answered `unavailable`

    async def publish(client: Client, cmid: str) -> Frame:
        reply = await client.request(
            {"type": "publish", "room": room, "body": {"c": cmid}, "client_msg_id": cmid},
            timeout=10,
        )
        if reply["type"] == "ack":
            acked[cmid] = reply
        else:
            assert reply["type"] == "error", reply
        return reply

    ann, joined = await join_on(a, ann_token, room)
    bob = await joined_client(b, bob_token, room)
    clients = [ann, bob]
    epoch = joined["epoch"]
    # Where Redis keeps its data nobody is disconnected: one user on each node stays connected
    # and quiet all along, and must stay present without ever being announced as gone.
    stayers: dict[str, Client] = {}
    if own_redis.persistent:
        for node, name in ((a, "stay-a"), (b, "stay-b")):
            token, user_id = guest(node.url, name)
            stayers[user_id] = await joined_client(node, token, room)
        clients += stayers.values()
    for i in range(3):
        assert (await publish(ann, f"before-{i}"))["type"] == "ack"
    bob_seen = [m["offset"] for m in await bob.messages(room, 3)]
    assert bob_seen == [1, 2, 3]
    await ann.messages(room, 3)
    async with httpx.AsyncClient() as http:
        history = await http.get(
            f"{a.url}/rooms/{room}/messages", headers={"Authorization": f"Bearer {ann_token}"}
        )
        assert [m["msg_id"] for m in history.json()["messages"]] == [
            acked[f"before-{i}"]["msg_id"] for i in range(3)
        ]

        own_redis.kill()
        killed_at = time.monotonic()

        async def both_unready() -> bool:
            for node in (a, b):
                status, body = await readiness(http, node)
                if status != 503 or body["checks"]["broker"] is not False:
                    return False
            return True

        await eventually(both_unready, 10, "/readyz reports the broker down on both nodes")
        # Meanwhile: publishes are refused, never acknowledged; the sockets stay up.
        for i, client in enumerate((ann, bob, ann)):
            reply = await publish(client, f"during-{i}")
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            refused.add(f"during-{i}")
        assert (await bob.request({"type": "ping"}))["type"] == "pong"
        newcomer = await Client.connect(a.ws_url, guest_token(a.url, "newcomer"))
        reply = await newcomer.request({"type": "join", "room": room})
        assert reply["type"] == "error" and reply["code"] == "unavailable", reply
        await newcomer.close()

        # An outage longer than the presence timeout: no node could refresh its entries.
        await asyncio.sleep(max(0.0, PRESENCE_TIMEOUT * 1.5 - (time.monotonic() - killed_at)))
        own_redis.start()  # same port: the nodes must find it by themselves
        restarted_at = time.monotonic()

        async def both_ready() -> bool:
            for node in (a, b):
                status, body = await readiness(http, node)
                if status != 200 or body["checks"]["broker"] is not True:
                    return False
            return True

        await eventually(both_ready, 15, "both nodes ready again after Redis came back")

        if own_redis.persistent:
            # Redis kept the room's counter: the same epoch goes on, nobody is disconnected.
            reply = await publish(ann, "after-0")
            assert reply["type"] == "ack" and reply["offset"] == 4, reply
            for client in (ann, bob):
                message = await client.event("message", room=room)
                assert (message["epoch"], message["offset"]) == (epoch, 4)
            # A reconnect on the other node recovers as it did before the outage.
            await bob.close()
            assert (await publish(ann, "after-1"))["type"] == "ack"
            bob, joined = await join_on(a, bob_token, room, since={"epoch": epoch, "offset": 4})
            clients.append(bob)
            assert joined["recovered"] is True
            assert [m["offset"] for m in joined["missed"]] == [5]
            current = epoch
        else:
            # Redis lost the room's counter: positions held by clients are void, so the nodes
            # close their members with 1011 (reconnect and recover)...
            for client in (ann, bob):
                assert await client.closed_with(timeout=10) == 1011
            # ...and recovery across the lost epoch says so: recovered false, reload history.
            since = {"epoch": epoch, "offset": 3}
            ann, ann_joined = await join_on(b, ann_token, room, since=since)
            bob, bob_joined = await join_on(a, bob_token, room, since=since)
            clients += [ann, bob]
            for joined in (ann_joined, bob_joined):
                assert joined["recovered"] is False and joined["missed"] == []
                assert joined["epoch"] != epoch and joined["offset"] == 0
            current = ann_joined["epoch"]
            assert bob_joined["epoch"] == current
            for i in range(2):
                reply = await publish(ann, f"after-{i}")
                assert reply["type"] == "ack" and reply["offset"] == i + 1, reply
            for client in (ann, bob):
                offsets = [(m["epoch"], m["offset"]) for m in await client.messages(room, 2)]
                assert offsets == [(current, 1), (current, 2)]

        # A retry of a refused publish (same client_msg_id) is a new message now.
        retry = await publish(bob, "during-1")
        assert retry["type"] == "ack", retry

        # Presence is whole again: every user, each once.
        everyone = {ann_id: 1, bob_id: 1} | {user_id: 1 for user_id in stayers}

        async def everyone_present() -> bool:
            return await presence_of(bob, room) == everyone

        await eventually(everyone_present, PRESENCE_TIMEOUT * 3, "presence after the outage")
        if own_redis.persistent:
            # The stayers and ann were connected all along: nobody may hear that they left,
            # neither right after the outage (when every entry looked stale) nor later.
            hold = max(0.1, restarted_at + PRESENCE_TIMEOUT * 1.5 - time.monotonic())
            stayed = {ann_id, *stayers}
            await asyncio.sleep(hold)
            for listener in [ann, *stayers.values()]:  # connected all along: they heard it all
                await listener.no_frame(lambda f: False, wait=0.2)  # reads what is in flight
                heard = [
                    f
                    for f in listener.frames
                    if f.get("type") == "presence_diff" and stayed & names_in(f, "leaves")
                ]
                assert heard == [], heard
            assert await presence_of(bob, room) == everyone

        # Nothing acknowledged was lost; nothing refused was stored (except its retry).
        history = await http.get(
            f"{b.url}/rooms/{room}/messages",
            params={"limit": 200},
            headers={"Authorization": f"Bearer {bob_token}"},
        )
        assert history.status_code == 200
        listed = history.json()["messages"]
        assert all(m["epoch"] == current for m in listed)
        in_epoch = {cmid: ack for cmid, ack in acked.items() if cmid.startswith(("after", "dur"))}
        if own_redis.persistent:
            in_epoch = acked
        assert {m["msg_id"] for m in listed} == {ack["msg_id"] for ack in in_epoch.values()}
        stored = stored_msg_ids(database, room)
        assert {ack["msg_id"] for ack in acked.values()} == stored
        assert {m["client_msg_id"] for m in listed}.isdisjoint(refused - {"during-1"})
    # A publish that answered `unavailable` reached nobody.
    for client in clients:
        seen = {f.get("client_msg_id") for f in client.frames if f.get("type") == "message"}
        assert seen.isdisjoint(refused - {"during-1"}), seen


async def test_node_started_while_redis_is_down_comes_up_by_itself(
    tmp_path: Path, sqlite_template: Path
) -> None:
    require_redis_server()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    own_redis = RedisServer(workdir, persistent=False)
    (node,) = start_nodes(tmp_path, sqlite_template, own_redis.url, ["early"])
    try:
        async with httpx.AsyncClient() as http:
            status, body = await readiness(http, node)
            assert (status, body["checks"]["broker"]) == (503, False)
            room = room_name()
            ann = await Client.connect(node.ws_url, guest_token(node.url, "ann"))
            reply = await ann.request({"type": "join", "room": room})
            assert (reply["type"], reply["code"]) == ("error", "unavailable")

            own_redis.start()

            async def ready() -> bool:
                return (await readiness(http, node))[0] == 200

            await eventually(ready, 15, "the node finds Redis by itself")
        assert (await ann.request({"type": "join", "room": room}))["type"] == "joined"
        ack = await ann.request({"type": "publish", "room": room, "body": {}})
        assert (ack["type"], ack["offset"]) == ("ack", 1)
        assert (await ann.event("message", room=room))["msg_id"] == ack["msg_id"]
        assert (await presence_of(ann, room)) == {ann.welcome["user"]["id"]: 1}
    finally:
        stop_nodes([node])
        own_redis.kill()
