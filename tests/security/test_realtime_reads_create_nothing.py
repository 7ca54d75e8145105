"""Reads create nothing (issue 15, Medium): `history` and `presence` on a name nobody joined
left Redis keys without expiry and a public room row behind, so one guest's `history` call
took the name for good (a later private room of that name got 409).

Now such a read answers empty and writes nothing, on the memory and the Redis backends.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.processes import ServerProcess, server_env
from tests.services import redis_db_url, require
from tests.wsclient import Client, guest

pytestmark = pytest.mark.slow

REDIS_URL = redis_db_url(13)


@pytest.fixture(params=["memory", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    extra = {}
    if request.param == "redis":
        require(REDIS_URL, 6379, "Redis")
        extra["COLLAB_BROKER_URL"] = REDIS_URL
    node = ServerProcess(server_env(tmp_path, extra), tmp_path / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


async def test_history_and_presence_of_an_unknown_room_leave_nothing(
    server: ServerProcess,
) -> None:
    room = f"unread-{uuid.uuid4().hex[:10]}"
    token, _ = guest(server.url, "reader")
    client = await Client.connect(server.ws_url, token)
    history = await client.request({"type": "history", "room": room})
    assert history["type"] == "history"
    assert history["messages"] == [] and history["has_more"] is False
    presence = await client.request({"type": "presence", "room": room})
    assert presence["type"] == "presence" and presence["members"] == []

    if server.env.get("COLLAB_BROKER_URL", "").startswith("redis"):
        keys = redis.Redis.from_url(REDIS_URL).keys(f"*{room}*")
        assert keys == [], f"a read created {keys}"

    # The name is still free: someone may make it a private room.
    owner, _ = guest(server.url, "owner")
    created = httpx.post(
        f"{server.url}/rooms",
        json={"name": room, "private": True},
        headers={"Authorization": f"Bearer {owner}"},
    )
    assert created.status_code == 201, created.text
    # And the reader, no member of it, is now refused there.
    refused = await client.request({"type": "history", "room": room})
    assert refused["type"] == "error" and refused["code"] == "forbidden"


async def test_reads_of_a_known_room_still_work(server: ServerProcess) -> None:
    room = f"known-{uuid.uuid4().hex[:10]}"
    writer = await Client.connect(server.ws_url, guest(server.url, "writer")[0])
    await writer.request({"type": "join", "room": room})
    ack = await writer.request({"type": "publish", "room": room, "body": {"text": "hi"}})
    assert ack["type"] == "ack"
    reader = await Client.connect(server.ws_url, guest(server.url, "reader")[0])
    history = await reader.request({"type": "history", "room": room})
    assert [m["body"] for m in history["messages"]] == [{"text": "hi"}]
    presence = await reader.request({"type": "presence", "room": room})
    assert [m["user"]["name"] for m in presence["members"]] == ["writer"]
