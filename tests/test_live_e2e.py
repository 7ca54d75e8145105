"""/ws/live end to end: dashboards subscribe to feeds that REST changes and services publish."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.processes import ServerProcess, server_env
from tests.wsclient import Client, guest_token

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("live")
    # `cpu` is a dashboard feed that guests may read; any other non-public feed is refused.
    env = server_env(folder, {"COLLAB_PUBLIC_FEEDS": "items,stats,cpu"})
    node = ServerProcess(env, folder / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def service_token(server: ServerProcess) -> str:
    """A service account made the way an operator makes one: `collab create-user`."""
    created = subprocess.run(
        [sys.executable, "-m", "collab", "create-user", "metrics-svc", "--role", "service"],
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
        data={"username": "metrics-svc", "password": "a long service password"},
    )
    assert response.status_code == 200
    token: str = response.json()["access_token"]
    return token


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_items_feed_snapshot_and_updates(server: ServerProcess) -> None:
    token = guest_token(server.url, "editor")
    first = httpx.post(f"{server.url}/items", json={"title": "one"}, headers=auth(token)).json()
    dashboard = await Client.connect(server.ws_url, guest_token(server.url, "dash"), "/ws/live")
    subscribed = await dashboard.request({"type": "subscribe", "feed": "items"})
    assert subscribed["type"] == "subscribed" and subscribed["feed"] == "items"
    assert first["id"] in [item["id"] for item in subscribed["snapshot"]]

    second = httpx.post(f"{server.url}/items", json={"title": "two"}, headers=auth(token)).json()
    created = await dashboard.event("update", feed="items")
    assert created["data"] == {"op": "created", "item": second}
    assert created["offset"] == subscribed["offset"] + 1 and created["ts"].endswith("Z")

    patched = httpx.patch(
        f"{server.url}/items/{second['id']}",
        json={"version": 1, "title": "two!"},
        headers=auth(token),
    ).json()
    updated = await dashboard.event("update", feed="items")
    assert updated["data"] == {"op": "updated", "item": patched}

    httpx.delete(f"{server.url}/items/{second['id']}", headers=auth(token))
    deleted = await dashboard.event("update", feed="items")
    assert deleted["data"]["op"] == "deleted" and deleted["data"]["item"]["id"] == second["id"]

    left = await dashboard.request({"type": "unsubscribe", "feed": "items"})
    assert left == {"type": "unsubscribed", "id": left["id"], "feed": "items"}
    httpx.post(f"{server.url}/items", json={"title": "unseen"}, headers=auth(token))
    assert await dashboard.no_frame(lambda f: f.get("type") == "update")


async def test_service_publishes_a_feed(server: ServerProcess, service_token: str) -> None:
    dashboard = await Client.connect(server.ws_url, guest_token(server.url, "dash"), "/ws/live")
    empty = await dashboard.request({"type": "subscribe", "feed": "cpu"})
    assert empty["snapshot"] is None and empty["offset"] == 0

    published = httpx.post(
        f"{server.url}/feeds/cpu", json={"data": {"load": 0.5}}, headers=auth(service_token)
    )
    assert published.status_code == 200 and published.json()["offset"] == 1
    update = await dashboard.event("update", feed="cpu")
    assert update["data"] == {"load": 0.5} and update["epoch"] == empty["epoch"]

    # A dashboard opened now shows the latest value at once, and recovers what it missed.
    late = await Client.connect(server.ws_url, guest_token(server.url, "late"), "/ws/live")
    snap = await late.request({"type": "subscribe", "feed": "cpu"})
    assert snap["snapshot"] == {"load": 0.5}
    await dashboard.close()
    for load in (0.6, 0.7):
        httpx.post(
            f"{server.url}/feeds/cpu", json={"data": {"load": load}}, headers=auth(service_token)
        )
    again = await Client.connect(server.ws_url, guest_token(server.url, "dash"), "/ws/live")
    since = {"epoch": update["epoch"], "offset": update["offset"]}
    resumed = await again.request({"type": "subscribe", "feed": "cpu", "since": since})
    assert resumed["recovered"] is True
    assert [m["data"]["load"] for m in resumed["missed"]] == [0.6, 0.7]


async def test_feed_publishing_is_for_services(server: ServerProcess, service_token: str) -> None:
    user = guest_token(server.url, "someone")
    denied = httpx.post(f"{server.url}/feeds/cpu", json={"data": {}}, headers=auth(user))
    assert denied.status_code == 403
    assert httpx.post(f"{server.url}/feeds/cpu", json={"data": {}}).status_code == 401
    for feed in ("items", "stats"):  # the server's own: nobody may pass for it
        builtin = httpx.post(
            f"{server.url}/feeds/{feed}", json={"data": {}}, headers=auth(service_token)
        )
        assert builtin.status_code == 403, feed
    for body in ({"data": [1]}, {"data": {"x": "y" * 70_000}}, {}):
        bad = httpx.post(f"{server.url}/feeds/cpu", json=body, headers=auth(service_token))
        assert bad.status_code == 422
    bad_name = httpx.post(
        f"{server.url}/feeds/has%20space", json={"data": {}}, headers=auth(service_token)
    )
    assert bad_name.status_code == 422


async def test_chat_commands_are_refused_on_live(server: ServerProcess) -> None:
    dashboard = await Client.connect(server.ws_url, guest_token(server.url), "/ws/live")
    for command in (
        {"type": "join", "room": "general"},
        {"type": "publish", "room": "general", "body": {}},
        {"type": "history", "room": "general"},
        {"type": "subscribe"},
        {"type": "subscribe", "feed": "bad name"},
    ):
        reply = await dashboard.request(command)
        assert reply["type"] == "error" and reply["code"] == "bad_request", command
    assert (await dashboard.request({"type": "ping"}))["type"] == "pong"
