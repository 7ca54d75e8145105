"""`collab.client` against real servers: a restart in the middle of a conversation, publishes
made while offline sent exactly once, a refused token replaced through `get_token`, timeouts.

The frames the client receives are checked against the AsyncAPI document as well.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from collab.client import (
    CollabClient,
    CollabError,
    ConnectionLost,
    Frame,
    RequestTimeout,
    State,
)
from tests.helpers import eventually
from tests.processes import RedisServer, ServerProcess, require_redis_server, server_env
from tests.protocol_schema import check_frame
from tests.test_service_publish import make_account
from tests.wsclient import Client, guest_token

pytestmark = pytest.mark.slow


def room_name() -> str:
    return f"py-{uuid.uuid4().hex[:10]}"


def state_of(client: CollabClient) -> State:
    """The client's state now: read through a call, as it changes behind an `await` (mypy
    would keep an earlier check's narrowing of `client.state`)."""
    return client.state


def start(tmp_path: Path, port: int | None = None) -> ServerProcess:
    env = server_env(tmp_path, {"COLLAB_SHUTDOWN_TIMEOUT": "3"})
    node = ServerProcess(env, tmp_path / "server.log")
    if port is not None:
        node.port = port
    return node.start()


async def messages(client: CollabClient, count: int) -> list[dict[str, Any]]:
    """The next `count` message events (other events skipped), each checked against the
    document."""
    found: list[dict[str, Any]] = []
    while len(found) < count:
        event = await client.next_event(15)
        if event["type"] in ("message", "typing", "presence_diff"):
            check_frame("/ws/chat", event)
        if event["type"] == "message":
            found.append(event)
    return found


async def test_a_server_restart_mid_conversation(tmp_path: Path) -> None:
    node = start(tmp_path)
    room = room_name()
    states: list[tuple[str, dict[str, Any]]] = []
    ann = CollabClient(
        node.ws_url,
        token=guest_token(node.url, "ann"),
        on_state=lambda state, info: states.append((state, info)),
        backoff_min=0.1,
        backoff_max=0.5,
    )
    bob = CollabClient(node.ws_url, token=guest_token(node.url, "bob"), backoff_min=0.1)
    await ann.connect()
    await bob.connect()
    try:
        await ann.join(room, presence_events=False)
        await bob.join(room, presence_events=False)
        for n in range(3):
            ack = await ann.publish(room, {"n": n})
            assert ack["offset"] == n + 1
        assert [m["offset"] for m in await messages(bob, 3)] == [1, 2, 3]

        # The server goes away (1001: reconnect and recover) ...
        node.stop()
        while ann.state not in ("reconnecting", "connecting"):
            await asyncio.sleep(0.05)
        assert ("disconnected", 1001) in [(s, i.get("code")) for s, i in states]
        # ... ann publishes while it is down: the publishes wait, then go out once ...
        offline = [asyncio.ensure_future(ann.publish(room, {"n": n})) for n in (3, 4)]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in offline)
        # ... and the server comes back on the same address and database.
        node = start(tmp_path, node.port)
        acks = await asyncio.wait_for(asyncio.gather(*offline), 20)
        assert sorted(a["offset"] for a in acks) == [4, 5]
        # Bob rejoined from offset 3 and gets 4 and 5, once each, in order.
        assert [m["body"]["n"] for m in await messages(bob, 2)] == [3, 4]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(messages(bob, 1), 0.5)
        assert state_of(ann) == "connected"
        assert [s for s, _ in states].count("connected") == 2

        # Stored exactly once each, in the order members saw.
        stored = httpx.get(
            f"{node.url}/rooms/{room}/messages",
            headers={"Authorization": f"Bearer {guest_token(node.url)}"},
        ).json()["messages"]
        assert [m["body"]["n"] for m in stored] == [0, 1, 2, 3, 4]
        assert [m["offset"] for m in stored] == [1, 2, 3, 4, 5]
    finally:
        await ann.close()
        await bob.close()
        node.stop()


async def test_rejoin_recovers_what_was_missed(tmp_path: Path) -> None:
    """Messages sent while a member was away arrive on rejoin (`missed`), with no gap."""
    node = start(tmp_path)
    room = room_name()
    try:
        ann = CollabClient(node.ws_url, token=guest_token(node.url, "ann"), backoff_min=0.1)
        await ann.connect()
        await ann.join(room, presence_events=False)
        await ann.publish(room, {"n": 0})
        assert len(await messages(ann, 1)) == 1
        # Drop ann's socket under it (a network loss: no close frame from the server).
        assert ann._ws is not None
        ann._ws.transport.abort()
        async with CollabClient(node.ws_url, token=guest_token(node.url, "bob")) as bob:
            await bob.join(room, presence_events=False)
            for n in (1, 2):
                await bob.publish(room, {"n": n})
        seen = [await ann.next_event(15)]
        while seen[-1]["type"] != "joined":
            seen.append(await ann.next_event(15))
        # The recovered messages came first, once each, then the rejoin's reply.
        assert [e["body"]["n"] for e in seen if e["type"] == "message"] == [1, 2]
        assert seen[-1]["recovered"] is True
        assert ann.positions[room][1] == 3
        await ann.close()
    finally:
        node.stop()


async def rejoined(client: CollabClient, rooms: set[str], wait: float = 20) -> list[Frame]:
    """The events up to the `joined` reply of every room in `rooms` (a rejoin's replies)."""
    seen: list[Frame] = []
    left = set(rooms)
    while left:
        event = await client.next_event(wait)
        seen.append(event)
        if event["type"] == "joined":
            left.discard(event["room"])
    return seen


async def test_a_client_in_more_rooms_than_the_burst_rejoins_every_one(tmp_path: Path) -> None:
    """A reconnect rejoins every room in one go, more than the server's command burst: the
    rejoins past it are answered `rate_limited`, and the client paces them at the server's
    rate instead of dropping those rooms."""
    env = server_env(tmp_path, {"COLLAB_RATE_BURST": "4", "COLLAB_RATE_LIMIT": "40"})
    node = ServerProcess(env, tmp_path / "server.log").start()
    rooms = [room_name() for _ in range(10)]
    try:
        async with (
            CollabClient(node.ws_url, token=guest_token(node.url, "ann"), backoff_min=0.1) as ann,
            CollabClient(node.ws_url, token=guest_token(node.url, "bob")) as bob,
        ):
            for room in rooms:  # joined at the server's pace (not what is tested here)
                await ann.join(room, presence_events=False)
                await bob.join(room, presence_events=False)
                await asyncio.sleep(0.06)
            assert ann._ws is not None
            ann._ws.transport.abort()  # the network goes; the client reconnects at once
            seen = await rejoined(ann, set(rooms))
            assert [e for e in seen if e["type"] == "error"] == []
            assert ann.state == "connected"
            # Every room is really joined again: each one's next message reaches ann.
            await asyncio.sleep(0.3)  # bob's command tokens back
            for room in rooms[-3:]:
                await bob.publish(room, {"room": room})
            got = [await ann.next_event(10) for _ in range(3)]
            assert [(e["type"], e["room"]) for e in got] == [("message", r) for r in rooms[-3:]]
    finally:
        node.stop()


async def test_a_burst_past_the_servers_rate_goes_through_at_its_pace(tmp_path: Path) -> None:
    """An app that joins ten rooms and publishes to each at once, against a burst of 4: what
    the server refuses as `rate_limited` (not carried out) the client sends again at the
    server's rate, so every join and every publish succeeds, each once."""
    env = server_env(tmp_path, {"COLLAB_RATE_BURST": "4", "COLLAB_RATE_LIMIT": "40"})
    node = ServerProcess(env, tmp_path / "server.log").start()
    rooms = [room_name() for _ in range(10)]
    try:
        async with CollabClient(node.ws_url, token=guest_token(node.url, "ann")) as ann:
            joined = await asyncio.gather(*(ann.join(r, presence_events=False) for r in rooms))
            assert [j["room"] for j in joined] == rooms
            acks = await asyncio.gather(*(ann.publish(r, {"r": r}) for r in rooms))
            assert [a["offset"] for a in acks] == [1] * 10
            seen = [await ann.next_event(10) for _ in range(10)]
            assert sorted(e["room"] for e in seen) == sorted(rooms)
    finally:
        node.stop()


async def test_a_client_reconnecting_during_a_broker_outage_gets_its_rooms_back(
    tmp_path: Path,
) -> None:
    """A client whose connection drops while Redis is down rejoins into `unavailable`: it keeps
    the room and tries again with backoff (not connected meanwhile, its publishes waiting), and
    is back in the room, with what was missed, once Redis is."""
    require_redis_server()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    redis_server = RedisServer(workdir, persistent=True)
    redis_server.start()
    env = server_env(tmp_path, {"COLLAB_BROKER_URL": redis_server.url})
    node = ServerProcess(env, tmp_path / "server.log").start()
    room = room_name()
    try:
        async with (
            CollabClient(
                node.ws_url, token=guest_token(node.url, "ann"), backoff_min=0.1, backoff_max=0.5
            ) as ann,
            CollabClient(node.ws_url, token=guest_token(node.url, "bob")) as bob,
        ):
            await ann.join(room, presence_events=False)
            await bob.join(room, presence_events=False)
            assert (await bob.publish(room, {"n": 1}))["offset"] == 1
            assert (await ann.next_event(10))["offset"] == 1

            redis_server.kill()
            assert ann._ws is not None
            ann._ws.transport.abort()

            async def connecting_again() -> bool:
                return ann.state == "connecting" and ann.welcome != {}

            await eventually(connecting_again, 10, "ann connected again, rejoining")
            publishing = asyncio.ensure_future(ann.publish(room, {"n": 2}))
            await asyncio.sleep(2)  # several rejoins answered `unavailable` meanwhile
            assert ann.state == "connecting"
            assert not publishing.done()
            assert ann._events.empty()  # no error: the room was not given up

            redis_server.start()  # same port and data: the same epoch goes on
            ack = await asyncio.wait_for(publishing, 30)
            assert ack["offset"] == 2
            events = await rejoined(ann, {room})
            assert events[-1]["recovered"] is True
            assert [e["type"] for e in events] == ["joined"]
            assert (await ann.next_event(10))["offset"] == 2
            assert state_of(ann) == "connected"
    finally:
        node.stop()
        redis_server.kill()


async def test_a_publish_whose_broker_reply_was_lost_is_not_called_undone(
    tmp_path: Path,
) -> None:
    """Redis stalls (SIGSTOP) with a publish in it: the server's read times out, but Redis
    runs the publish when it wakes, so its members get it. The reply must not say "not done"
    (a retry under a new id would then deliver it twice): it says `delivery: "unknown"`, a
    retry with the same client_msg_id gets the first one's ack, and the client library does
    that retry by itself. Every message reaches the room once, and one that went out is
    stored before any retry (the reconciler takes it from the window)."""
    require_redis_server()
    workdir = tmp_path / "redis"
    workdir.mkdir()
    redis_server = RedisServer(workdir)
    redis_server.start()
    env = server_env(
        tmp_path,
        {
            "COLLAB_BROKER_URL": redis_server.url,
            "COLLAB_RECONCILE_GRACE": "1",
            "COLLAB_RECONCILE_INTERVAL": "0.5",
        },
    )
    node = ServerProcess(env, tmp_path / "server.log").start()
    room = room_name()
    try:
        ann = await Client.connect(node.ws_url, guest_token(node.url, "ann"))
        bob = await Client.connect(node.ws_url, guest_token(node.url, "bob"))
        for member in (ann, bob):
            await member.request({"type": "join", "room": room, "presence_events": False})
        async with CollabClient(node.ws_url, token=guest_token(node.url, "cid")) as cid:
            await cid.join(room, presence_events=False)
            # One message before: the room is marked as one to reconcile, so the next
            # publishes go straight to the script (a publish that stalls on the mark before
            # it never ran, and says so: "not done").
            assert (await cid.publish(room, {"n": 0}))["offset"] == 1
            assert [m["body"]["n"] for m in await bob.messages(room, 1)] == [0]
            service = {"Authorization": f"Bearer {make_account(node, 'svc', 'service')}"}

            def rest_publish() -> httpx.Response:
                return httpx.post(
                    f"{node.url}/rooms/{room}/messages",
                    json={"body": {"n": 3}, "client_msg_id": "s-1"},
                    headers=service,
                    timeout=20,
                )

            assert redis_server.process is not None
            redis_server.process.send_signal(signal.SIGSTOP)
            try:
                publish = {"type": "publish", "room": room, "body": {"n": 1}}
                reply = await ann.request({**publish, "client_msg_id": "a-1"}, timeout=20)
                check_frame("/ws/chat", reply)
                assert reply["code"] == "unavailable" and reply["delivery"] == "unknown", reply
                assert reply["room"] == room and "outcome" not in reply
                # REST says the same (503, detail.delivery), and cid's client retries alone.
                by_rest = asyncio.ensure_future(asyncio.to_thread(rest_publish))
                by_cid = asyncio.ensure_future(cid.publish(room, {"n": 2}))
                stalled = asyncio.get_running_loop().time()
                feed = await asyncio.to_thread(
                    httpx.post,
                    f"{node.url}/feeds/sensors",
                    json={"data": {"t": 1}},
                    headers=service,
                    timeout=20,
                )
                refused = await by_rest
                for response in (refused, feed):
                    assert response.status_code == 503, response.text
                    assert response.json()["detail"]["delivery"] == "unknown"
                # Past the room's 5 s mark refresh, cid's retries stall on the mark before
                # the script and are answered "not done": the first try may still have gone
                # out, so its client keeps trying rather than calling the publish failed.
                await asyncio.sleep(max(0.0, stalled + 7.5 - asyncio.get_running_loop().time()))
                assert not by_cid.done()
            finally:
                redis_server.process.send_signal(signal.SIGCONT)
            # What Redis had been sent before it stalled, it runs now: a message the reply
            # could not call "not done" (a publish a stalled Redis never received, on a
            # connection still opening, does not run; the reply cannot tell the two apart).
            # Ann's went out on a connection already open (the first command of the stall):
            # members get it, and with no retry the reconciler stores it from the window.
            first = await bob.wait_for(
                lambda f: f.get("type") == "message" and f["body"] == {"n": 1}, 10
            )
            reader = {"Authorization": f"Bearer {guest_token(node.url, 'reader')}"}

            def stored_ids() -> list[str]:
                listed = httpx.get(f"{node.url}/rooms/{room}/messages", headers=reader)
                return [m["msg_id"] for m in listed.json()["messages"]]

            async def stored_without_a_retry() -> bool:
                return first["msg_id"] in stored_ids()

            await eventually(stored_without_a_retry, 15, "the reconciler storing ann's", 0.2)
            # Retried with the same ids, every message is in the room once; ann's retry gets
            # the first attempt's ack.
            retried = await ann.request({**publish, "client_msg_id": "a-1"}, timeout=20)
            again = await asyncio.to_thread(rest_publish)
            assert again.status_code == 201, again.text
            by_cid_ack = await asyncio.wait_for(by_cid, 30)
            await bob.no_frame(lambda f: False, wait=1.5)
            got = [f for f in bob.frames if f.get("type") == "message"]
            assert sorted(m["body"]["n"] for m in got) == [0, 1, 2, 3]  # each once
            msg_ids = {m["body"]["n"]: m["msg_id"] for m in got}
            assert retried["type"] == "ack" and retried["msg_id"] == msg_ids[1]
            assert again.json()["msg_id"] == msg_ids[3]
            assert by_cid_ack["msg_id"] == msg_ids[2]
            assert sorted(stored_ids()) == sorted(msg_ids.values())  # stored: each once
            # Counted for the operator: ann's, the REST one, and at least one of cid's tries.
            metrics = httpx.get(f"{node.url}/metrics").text
            line = next(
                x for x in metrics.splitlines() if x.startswith("collab_messages_delivery_unknown")
            )
            assert float(line.split()[-1]) >= 3, line
        await ann.close()
        await bob.close()
    finally:
        node.stop()
        redis_server.kill()


async def test_a_publish_stays_unknown_until_a_retry_settles_it() -> None:
    """The publish retry rule, apart from any server: after a reply that left the outcome
    unknown, a retry answered plainly `unavailable` ("not done") says nothing of the first
    attempt, so the retries go on; out of retries, the error raised is the unknown one, never
    the "not done" that would invite a retry under a new id."""
    unknown = CollabError({"type": "error", "code": "unavailable", "delivery": "unknown"})
    not_done = CollabError({"type": "error", "code": "unavailable", "message": "not done"})
    ack: Frame = {"type": "ack", "offset": 7}

    async def run(answers: Sequence[CollabError | Frame]) -> tuple[Frame | CollabError, int]:
        replies = list(answers)
        client = CollabClient("ws://127.0.0.1:1", token="t", backoff_min=0.001, backoff_max=0.002)
        sent: list[Frame] = []

        async def request(command: Frame) -> Frame:
            sent.append(command)
            reply = replies.pop(0)
            if isinstance(reply, CollabError):
                raise reply
            return reply

        client.request = request  # type: ignore[method-assign]
        try:
            return await client.publish("r", {"n": 1}), len(sent)
        except CollabError as exc:
            assert len({c["client_msg_id"] for c in sent}) == 1  # one id throughout
            return exc, len(sent)

    assert await run([unknown, not_done, not_done, ack]) == (ack, 4)
    assert await run([not_done]) == (not_done, 1)  # nothing unknown before: "not done" stands
    assert await run([unknown] + [not_done] * 10) == (unknown, 6)
    forbidden = CollabError({"type": "error", "code": "forbidden", "message": "left the room"})
    assert await run([unknown, forbidden]) == (unknown, 2)  # the first may still have gone out


async def test_a_refused_token_is_replaced_through_get_token(tmp_path: Path) -> None:
    node = start(tmp_path)
    good = guest_token(node.url, "ann")
    handed: list[str] = []

    async def get_token() -> str:
        # The first token is refused (4401); the client asks again and gets a good one.
        token = "not-a-token" if not handed else good
        handed.append(token)
        return token

    states: list[tuple[str, dict[str, Any]]] = []
    client = CollabClient(
        node.ws_url,
        get_token=get_token,
        backoff_min=0.05,
        on_state=lambda state, info: states.append((state, info)),
    )
    try:
        await asyncio.wait_for(client.connect(), 15)
        assert handed == ["not-a-token", good]
        assert ("disconnected", 4401) in [(s, i.get("code")) for s, i in states]
        assert client.welcome["user"]["name"] == "ann"
        # Without get_token a refused token ends the client for good.
        alone = CollabClient(node.ws_url, token="not-a-token")
        with pytest.raises(ConnectionLost, match="4401"):
            await asyncio.wait_for(alone.connect(), 15)
        assert alone.state == "closed"
        await alone.close()
    finally:
        await client.close()
        node.stop()


async def test_a_request_without_reply_times_out(tmp_path: Path) -> None:
    node = start(tmp_path)
    client = CollabClient(node.ws_url, token=guest_token(node.url), request_timeout=0.5)
    await client.connect()
    try:
        node.signal(signal.SIGSTOP)  # the server stops answering, without closing anything
        try:
            with pytest.raises(RequestTimeout):
                await client.ping()
        finally:
            node.signal(signal.SIGCONT)
        assert (await client.ping())["type"] == "pong"
    finally:
        await client.close()
        node.stop()


async def test_a_publish_whose_storage_did_not_confirm_is_sent_again_once(tmp_path: Path) -> None:
    """Storage stalls (the SQLite file locked by another process) past the persist timeout:
    the server answers `outcome: "unknown"`, the client sends the publish again with the same
    client_msg_id, and once storage is back the retry is acknowledged with the first
    message's place. Members got it once; it is stored once."""
    env = server_env(tmp_path, {"COLLAB_PERSIST_TIMEOUT": "0.3"})
    node = ServerProcess(env, tmp_path / "server.log").start()
    room = room_name()
    try:
        async with (
            CollabClient(node.ws_url, token=guest_token(node.url, "ann")) as ann,
            CollabClient(node.ws_url, token=guest_token(node.url, "bob")) as bob,
        ):
            await ann.join(room, presence_events=False)
            await bob.join(room, presence_events=False)
            locker = sqlite3.connect(tmp_path / "collab.db", isolation_level=None)
            locker.execute("BEGIN EXCLUSIVE")  # every write of the server now waits
            try:
                publishing = asyncio.ensure_future(ann.publish(room, {"n": 1}))
                await eventually(
                    lambda: unconfirmed_at_least(node, 1), 10, "an outcome-unknown reply", 0.1
                )
                assert not publishing.done()
            finally:
                locker.execute("ROLLBACK")
                locker.close()
            ack = await asyncio.wait_for(publishing, 20)
            assert ack["offset"] == 1
            got = await messages(bob, 1)
            assert got[0]["msg_id"] == ack["msg_id"]
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(messages(bob, 1), 0.5)
        stored = httpx.get(
            f"{node.url}/rooms/{room}/messages",
            headers={"Authorization": f"Bearer {guest_token(node.url)}"},
        ).json()["messages"]
        assert [m["msg_id"] for m in stored] == [ack["msg_id"]]
    finally:
        node.stop()


async def unconfirmed_at_least(node: ServerProcess, count: int) -> bool:
    """Whether the server has answered `count` publishes with `outcome: "unknown"`."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{node.url}/metrics", timeout=5)).text
    for line in text.splitlines():
        if line.startswith("collab_messages_unconfirmed_replies"):
            return float(line.split()[-1]) >= count
    return False
