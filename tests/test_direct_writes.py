"""Frames written straight to uvicorn's transport (`realtime.transport`), and the fallback.

`collab serve` writes each message's prebuilt frame to every member's transport, bypassing
ASGI `send`. That leans on uvicorn's internals, so these tests pin both halves: under
`collab serve` the direct path must engage (if a uvicorn upgrade changes what it relies on,
the first test here fails instead of the server silently getting slower), and under any other
server the same app must work through plain ASGI `send`.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.frames import Frame, Opcode

from realtime.transport import text_frame
from tests.processes import UVICORN_WSPROTO, ServerProcess, server_env
from tests.wsclient import Client, guest_token


@pytest.mark.parametrize("size", [0, 1, 125, 126, 127, 65535, 65536, 70000])
def test_prebuilt_frame_is_the_frame_websockets_would_send(size: int) -> None:
    payload = ("é" * size).encode()[:size]  # multi-byte UTF-8, cut anywhere: bytes are bytes
    assert text_frame(payload) == Frame(Opcode.TEXT, payload).serialize(mask=False)


def direct_connections(server: ServerProcess) -> float:
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    found = re.search(r"^collab_direct_write_connections (\S+)$", metrics, re.M)
    assert found, "collab_direct_write_connections missing from /metrics"
    return float(found.group(1))


@pytest.fixture(params=["collab serve", "uvicorn --ws wsproto"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServerProcess]:
    command = None if request.param == "collab serve" else UVICORN_WSPROTO
    env = server_env(tmp_path, {"COLLAB_RATE_LIMIT": "1000", "COLLAB_RATE_BURST": "1000"})
    node = ServerProcess(env, tmp_path / "server.log", command=command).start()
    try:
        yield node
    finally:
        node.stop()


async def test_a_burst_reaches_every_member_whole_and_in_order(server: ServerProcess) -> None:
    """Many messages in one loop turn: coalesced per member, still one frame per message."""
    room = f"r-{uuid.uuid4().hex[:8]}"
    members = [
        await Client.connect(server.ws_url, guest_token(server.url, f"m{i}")) for i in range(3)
    ]
    for member in members:
        await member.request({"type": "join", "room": room})
    direct = direct_connections(server)
    assert direct == (3 if server.command is None else 0), server.log()

    bodies = [{"n": n, "text": "ü" * (n * 40)} for n in range(200)]  # 0 B to 16 KB frames
    for body in bodies:
        await members[0].send({"type": "publish", "room": room, "body": body})
    for member in members:
        got = await member.messages(room, len(bodies), timeout=20)
        assert [m["body"] for m in got] == bodies
        assert [m["offset"] for m in got] == list(range(1, len(bodies) + 1))
    # Replies to one connection alone (acks, errors) take the same path.
    error = await members[1].request({"type": "publish", "room": "not-joined", "body": {"n": -1}})
    assert error["type"] == "error" and error["code"] == "not_joined"
