"""`/ws/live` feeds have rules (issue 15, Medium: a guest subscribed to `billing.internal`).

Public feeds (`COLLAB_PUBLIC_FEEDS`: names, or prefixes ending in `*`; default `items,stats`)
are open to every authenticated user; a feed granted in `COLLAB_FEED_GRANTS` to a user
(`user:<id>`) or a role (`role:<role>`) to them; any other feed only to service and admin
tokens.
Everyone else gets `forbidden` on subscribe, and the connection lives on.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import orjson
import pytest

from tests.processes import ServerProcess, server_env
from tests.wsclient import Client, guest, guest_token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("feeds")
    env = server_env(
        folder,
        {
            "COLLAB_PUBLIC_FEEDS": "items,stats,public.*",
            "COLLAB_FEED_GRANTS": orjson.dumps({"team.*": ["role:user"]}).decode(),
        },
    )
    node = ServerProcess(env, folder / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


def service_token(server: ServerProcess) -> str:
    created = subprocess.run(
        [sys.executable, "-m", "collab", "create-user", "billing-svc", "--role", "service"],
        input="a long service password\n",
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    response = httpx.post(
        f"{server.url}/auth/token",
        data={"username": "billing-svc", "password": "a long service password"},
    )
    assert response.status_code == 200
    token: str = response.json()["access_token"]
    return token


async def test_guests_get_public_feeds_only(server: ServerProcess) -> None:
    guest = await Client.connect(server.ws_url, guest_token(server.url, "nosy"), "/ws/live")
    for feed in ("billing.internal", "public", "publicity", "stats.secret", "items2"):
        reply = await guest.request({"type": "subscribe", "feed": feed})
        assert reply["type"] == "error" and reply["code"] == "forbidden", (feed, reply)
    for feed in ("items", "stats", "public.sales", "public.x.y"):
        reply = await guest.request({"type": "subscribe", "feed": feed})
        assert reply["type"] == "subscribed", (feed, reply)
    # Refusals changed nothing: the connection holds exactly the public feeds it asked for.
    assert (await guest.request({"type": "ping"}))["type"] == "pong"


async def test_services_subscribe_to_any_feed(server: ServerProcess) -> None:
    token = service_token(server)
    service = await Client.connect(server.ws_url, token, "/ws/live")
    reply = await service.request({"type": "subscribe", "feed": "billing.internal"})
    assert reply["type"] == "subscribed"
    published = httpx.post(
        f"{server.url}/feeds/billing.internal",
        json={"data": {"invoice": 7}},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert published.status_code == 200
    update = await service.event("update", feed="billing.internal")
    assert update["data"] == {"invoice": 7}
    # A guest that subscribed to a public feed never sees the private one's updates.
    guest = await Client.connect(server.ws_url, guest_token(server.url, "dash"), "/ws/live")
    await guest.request({"type": "subscribe", "feed": "stats"})
    assert await guest.no_frame(lambda f: f.get("feed") == "billing.internal")


async def test_granted_feeds_are_for_their_grantees(server: ServerProcess) -> None:
    """`team.*` is granted to the role `user` (guests have it); a name outside the prefix
    is not."""
    token, _ = guest(server.url, "member")
    client = await Client.connect(server.ws_url, token, "/ws/live")
    granted = await client.request({"type": "subscribe", "feed": "team.sales"})
    assert granted["type"] == "subscribed"
    refused = await client.request({"type": "subscribe", "feed": "teams"})
    assert refused["type"] == "error" and refused["code"] == "forbidden"
