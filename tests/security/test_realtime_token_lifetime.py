"""Open WebSockets do not outlive their token (issue 15, Medium).

- A socket is closed with 4401 ("get a new token") when its token expires, unless the
  client sent `refresh` with a newer token of the same user first.
- Deleting an account closes that user's sockets at once, on every node of a cluster
  (`Node.disconnect_user`, through the broker's control channel).

A token that expires within seconds is minted here with the servers' secret, as the API
would with a short `COLLAB_ACCESS_TOKEN_MINUTES`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import jwt
import pytest

from api.security import create_access_token
from tests.processes import ServerProcess, server_env
from tests.services import redis_db_url, require
from tests.test_cluster_e2e import forget_run_keys, start_nodes, stop_nodes
from tests.wsclient import Client, guest

pytestmark = pytest.mark.slow

SECRET = server_env(Path("."))["COLLAB_SECRET_KEY"]
CLUSTER_REDIS_URL = redis_db_url(13)


def short_token(of: str, name: str, seconds: float) -> tuple[str, int]:
    """A valid token of the account of token `of` that expires `seconds` from now; its `exp`."""
    claims = jwt.decode(of, SECRET, algorithms=["HS256"])
    lifetime = timedelta(minutes=1)
    issued = datetime.now(UTC) - lifetime + timedelta(seconds=seconds)
    token = create_access_token(
        SECRET,
        user_id=int(claims["sub"]),
        name=name,
        role="user",
        version=int(claims["ver"]),
        minutes=1,
        now=issued,
    )
    return token, int((issued + lifetime).timestamp())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("tokens")
    node = ServerProcess(server_env(folder), folder / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


@pytest.mark.parametrize("path", ["/ws/chat", "/ws/live"])
async def test_socket_is_closed_4401_when_its_token_expires(
    server: ServerProcess, path: str
) -> None:
    first, _ = guest(server.url, "brief")
    token, exp = short_token(first, "brief", 2)
    client = await Client.connect(server.ws_url, token, path)
    assert client.welcome["expires_at"] == exp
    assert (await client.request({"type": "ping"}))["type"] == "pong"
    assert await client.closed_with(timeout=20) == 4401


async def test_refresh_in_band_keeps_the_socket_open(server: ServerProcess) -> None:
    long_token, _ = guest(server.url, "keeper")
    other_token, _ = guest(server.url, "other")
    expired, _ = short_token(long_token, "keeper", -5)
    token, exp = short_token(long_token, "keeper", 4)
    client = await Client.connect(server.ws_url, token)
    room = f"t-{uuid.uuid4().hex[:8]}"
    await client.request({"type": "join", "room": room})

    # Refused: not a token, another user's token, an expired token. The old one still holds.
    for bad in ("not-a-token", other_token, expired):
        refused = await client.request({"type": "refresh", "token": bad})
        assert refused["type"] == "error" and refused["code"] == "unauthorized", refused
    malformed = await client.request({"type": "refresh", "token": 42})
    assert malformed["code"] == "bad_request"

    refreshed = await client.request({"type": "refresh", "token": long_token})
    assert refreshed["type"] == "refreshed"
    assert refreshed["expires_at"] > exp + 3600

    # Past the first token's expiry the socket still works, and is still in its room.
    await asyncio.sleep(max(0.0, exp - time.time()) + 1.5)
    ack = await client.request({"type": "publish", "room": room, "body": {"text": "still here"}})
    assert ack["type"] == "ack", ack


async def test_deleting_an_account_closes_its_sockets(server: ServerProcess) -> None:
    token, user_id = guest(server.url, "leaver")
    chat = await Client.connect(server.ws_url, token)
    live = await Client.connect(server.ws_url, token, "/ws/live")
    bystander = await Client.connect(server.ws_url, guest(server.url, "stays")[0])
    response = httpx.delete(
        f"{server.url}/users/{user_id}", headers={"Authorization": f"Bearer {token}"}
    )
    assert response.status_code == 204
    assert await chat.closed_with() == 4401
    assert await live.closed_with() == 4401
    assert (await bystander.request({"type": "ping"}))["type"] == "pong"


async def test_changing_the_password_closes_the_accounts_sockets(server: ServerProcess) -> None:
    name = f"pw{uuid.uuid4().hex[:8]}"
    with httpx.Client(base_url=server.url, timeout=10) as http:
        registered = http.post(
            "/auth/register", json={"username": name, "password": "first-pass-1"}
        )
        assert registered.status_code in (200, 201), registered.text
        user_id = registered.json()["id"]
        login = http.post("/auth/token", data={"username": name, "password": "first-pass-1"})
        token = login.json()["access_token"]
        chat = await Client.connect(server.ws_url, token)
        bystander = await Client.connect(server.ws_url, guest(server.url, "stays")[0])
        changed = http.patch(
            f"/users/{user_id}",
            headers={"Authorization": f"Bearer {token}"},
            json={"password": "second-pass-2", "current_password": "first-pass-1"},
        )
        assert changed.status_code == 200, changed.text
    assert await chat.closed_with() == 4401
    assert (await bystander.request({"type": "ping"}))["type"] == "pong"


@pytest.mark.redis
async def test_deleting_an_account_closes_its_sockets_on_every_node(
    tmp_path: Path, sqlite_template: Path
) -> None:
    require(CLUSTER_REDIS_URL, 6379, "Redis")
    nodes = start_nodes(tmp_path, sqlite_template, CLUSTER_REDIS_URL, ["a", "b"])
    try:
        a, b = nodes
        token, user_id = guest(a.url, "roamer")
        on_b = await Client.connect(b.ws_url, token)
        also_on_b = await Client.connect(b.ws_url, token, "/ws/live")
        on_a = await Client.connect(a.ws_url, token)
        bystander = await Client.connect(b.ws_url, guest(a.url, "stays")[0])
        response = httpx.delete(
            f"{a.url}/users/{user_id}", headers={"Authorization": f"Bearer {token}"}
        )
        assert response.status_code == 204
        assert await on_b.closed_with() == 4401
        assert await also_on_b.closed_with() == 4401
        assert await on_a.closed_with() == 4401
        assert (await bystander.request({"type": "ping"}))["type"] == "pong"
    finally:
        stop_nodes(nodes)
        forget_run_keys(CLUSTER_REDIS_URL)
