"""Embedded mode (no COLLAB_CELERY_BROKER_URL): the server stores messages itself, in SQLite,
and its history outlives the process.

A real `collab serve` is stopped and started again on the same SQLite file: the REST API and
the `history` command return every acknowledged message, a reconnecting client recovers from
the database, and new messages continue the offsets of the same epoch.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import ServerProcess, server_env
from tests.wsclient import Client, Frame, guest

pytestmark = pytest.mark.slow


def start(env: dict[str, str], folder: Path) -> ServerProcess:
    return ServerProcess(env, folder / "server.log").start()


async def rest_messages(server: ServerProcess, token: str, room: str) -> list[Frame]:
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=10) as http:
        response = await http.get(f"/rooms/{room}/messages", params={"after": 0, "limit": 200})
    assert response.status_code == 200, response.text
    messages: list[Frame] = response.json()["messages"]
    return messages


async def publish_all(client: Client, room: str, count: int, tag: str) -> list[Frame]:
    acks = []
    for n in range(count):
        command = {"type": "publish", "room": room, "body": {"n": n, "by": tag}}
        reply = await client.request({**command, "client_msg_id": f"{tag}{n}"})
        assert reply["type"] == "ack", reply
        acks.append(reply)
    return acks


async def test_history_survives_a_restart_and_offsets_continue(tmp_path: Path) -> None:
    env = server_env(tmp_path, {"COLLAB_RATE_LIMIT": "1000", "COLLAB_RATE_BURST": "1000"})
    assert "COLLAB_CELERY_BROKER_URL" not in env
    room = f"emb-{uuid.uuid4().hex[:8]}"
    server = start(env, tmp_path)
    try:
        ann_token, _ = guest(server.url, "ann")
        bob_token, _ = guest(server.url, "bob")
        ann = await Client.connect(server.ws_url, ann_token)
        bob = await Client.connect(server.ws_url, bob_token)
        joined = await ann.request({"type": "join", "room": room})
        await bob.request({"type": "join", "room": room})
        epoch = joined["epoch"]
        acks = await asyncio.gather(
            publish_all(ann, room, 20, "a"), publish_all(bob, room, 15, "b")
        )
        assert sorted(a["offset"] for batch in acks for a in batch) == list(range(1, 36))
        before = await rest_messages(server, ann_token, room)
        await ann.close()
        await bob.close()
    finally:
        server.stop()

    assert [m["offset"] for m in before] == list(range(1, 36))
    acked = {a["msg_id"]: a["offset"] for batch in acks for a in batch}
    assert {m["msg_id"]: m["offset"] for m in before} == acked
    assert {m["epoch"] for m in before} == {epoch}

    server = start(env, tmp_path)  # the same SQLite file, a new process
    try:
        # The same durable history, through REST and through the `history` command.
        assert await rest_messages(server, ann_token, room) == before
        ann = await Client.connect(server.ws_url, ann_token)
        history = await ann.request({"type": "history", "room": room, "limit": 50})
        assert history["messages"] == before
        assert history["has_more"] is False

        # A client that saw offset 30 recovers 31..35 from the database, in the same epoch.
        again = await ann.request(
            {"type": "join", "room": room, "since": {"epoch": epoch, "offset": 30}}
        )
        assert (again["epoch"], again["offset"]) == (epoch, 35)
        assert again["recovered"] is True
        assert again["missed"] == before[30:]

        # And the room goes on from there.
        ack = await ann.request({"type": "publish", "room": room, "body": {"after": "restart"}})
        assert ack["type"] == "ack" and ack["offset"] == 36
        event: dict[str, Any] = await ann.event("message", room=room)
        assert (event["epoch"], event["offset"], event["msg_id"]) == (epoch, 36, ack["msg_id"])
        await ann.close()
        after = await rest_messages(server, ann_token, room)
        assert after[:35] == before
        assert after[35]["body"] == {"after": "restart"}
    finally:
        server.stop()
