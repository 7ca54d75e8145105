"""Publishing from services: `POST /rooms/{room}/messages` and `collab.publisher` from a script.

A real server on a Redis broker of the test's own; members are `collab.client` clients, and
everything they receive is also checked against the AsyncAPI document by the same rules.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from collab.client import CollabClient
from tests.processes import RedisServer, ServerProcess, require_redis_server, server_env
from tests.protocol_schema import check_frame
from tests.wsclient import guest_token

pytestmark = pytest.mark.slow

PASSWORD = "a long service password"


def room_name() -> str:
    return f"svc-{uuid.uuid4().hex[:10]}"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    require_redis_server()
    folder = tmp_path_factory.mktemp("service-publish")
    redis = RedisServer(folder)
    redis.start()
    node = ServerProcess(
        server_env(
            folder,
            {
                "COLLAB_BROKER_URL": redis.url,
                "COLLAB_MAX_BODY_BYTES": "1024",
                # The guest members below watch feeds a script publishes to.
                "COLLAB_PUBLIC_FEEDS": "items,stats,jobs-*",
            },
        ),
        folder / "server.log",
    )
    try:
        node.start()
        yield node
    finally:
        node.stop()
        redis.stop()


def make_account(server: ServerProcess, username: str, role: str) -> str:
    """An account made the way an operator makes one (`collab create-user`); its token."""
    created = subprocess.run(
        [sys.executable, "-m", "collab", "create-user", username, "--role", role],
        input=PASSWORD + "\n",
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    response = httpx.post(
        f"{server.url}/auth/token", data={"username": username, "password": PASSWORD}
    )
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


@pytest.fixture(scope="module")
def service_token(server: ServerProcess) -> str:
    return make_account(server, "reports-svc", "service")


@pytest.fixture
async def member(server: ServerProcess) -> AsyncIterator[CollabClient]:
    client = CollabClient(server.ws_url, token=guest_token(server.url, "member"))
    await client.connect()
    try:
        yield client
    finally:
        await client.close()


async def next_checked(client: CollabClient, path: str = "/ws/chat") -> dict[str, object]:
    event = await client.next_event(10)
    check_frame(path, event)
    return event


async def test_a_service_publishes_like_a_member(
    server: ServerProcess, service_token: str, member: CollabClient
) -> None:
    room = room_name()
    await member.join(room, presence_events=False)
    url = f"{server.url}/rooms/{room}/messages"
    body = {"body": {"text": "build passed"}, "client_msg_id": "build-1"}

    # Ordinary users may not; neither may anyone without a token.
    assert httpx.post(url, json=body, headers=auth(guest_token(server.url))).status_code == 403
    assert httpx.post(url, json=body).status_code == 401

    first = httpx.post(url, json=body, headers=auth(service_token))
    assert first.status_code == 201, first.text
    ack = first.json()
    assert set(ack) == {"room", "epoch", "offset", "msg_id"}
    assert ack["room"] == room and ack["offset"] == 1
    message = await next_checked(member)
    assert message["type"] == "message" and message["offset"] == 1
    assert message["msg_id"] == ack["msg_id"] and message["client_msg_id"] == "build-1"
    assert message["body"] == {"text": "build passed"}
    assert message["user"] == {"id": message["user"]["id"], "name": "reports-svc"}  # type: ignore[index]

    # The same client_msg_id again: the first answer, nothing delivered twice.
    again = httpx.post(url, json={**body, "body": {"text": "other"}}, headers=auth(service_token))
    assert again.status_code == 201 and again.json() == ack
    # A member's own publish after it takes the next offset: one sequence for both paths.
    own = await member.publish(room, {"text": "thanks"})
    assert own["offset"] == 2
    assert (await next_checked(member))["offset"] == 2

    # Stored like any other (the 201 came once storage confirmed it).
    stored = httpx.get(f"{url}?limit=10", headers=auth(service_token)).json()["messages"]
    assert [(m["offset"], m["body"]) for m in stored] == [
        (1, {"text": "build passed"}),
        (2, {"text": "thanks"}),
    ]


async def test_the_publish_rules_of_the_wire_apply(
    server: ServerProcess, service_token: str
) -> None:
    url = f"{server.url}/rooms/{room_name()}/messages"
    headers = auth(service_token)
    too_large = httpx.post(url, json={"body": {"pad": "x" * 2000}}, headers=headers)
    assert too_large.status_code == 413
    for bad in (
        {"body": {"t": 1}, "client_msg_id": "bad\u0001id"},
        {"body": {"t": 1}, "client_msg_id": ""},
        {"body": [1]},
        {"text": "no body"},
    ):
        assert httpx.post(url, json=bad, headers=headers).status_code == 422, bad
    assert (
        httpx.post(
            f"{server.url}/rooms/bad%20name/messages", json={"body": {}}, headers=headers
        ).status_code
        == 422
    )

    # A private room refuses a service that is not a member.
    owner = guest_token(server.url, "owner")
    private = room_name()
    created = httpx.post(
        f"{server.url}/rooms", json={"name": private, "private": True}, headers=auth(owner)
    )
    assert created.status_code == 201
    refused = httpx.post(
        f"{server.url}/rooms/{private}/messages", json={"body": {}}, headers=headers
    )
    assert refused.status_code == 403


SCRIPT = """
import asyncio, sys
from collab.publisher import Publisher, publish_sync
from collab.settings import Settings

room, feed = sys.argv[1], sys.argv[2]
job = {"client_msg_id": "job-7", "name": "nightly"}
first = publish_sync(Settings(), room, {"text": "from a script"}, **job)
again = publish_sync(Settings(), room, {"text": "retried"}, **job)
assert (again.offset, again.msg_id) == (first.offset, first.msg_id), (first, again)

async def feed_update():
    async with Publisher.from_env(name="nightly") as publisher:
        await publisher.publish_feed(feed, {"load": 0.25})

asyncio.run(feed_update())
print(first.offset, first.msg_id)
"""


async def test_a_script_publishes_through_the_broker_without_a_server(
    server: ServerProcess, member: CollabClient
) -> None:
    """What a Celery task does (docs/CLIENTS.md): `collab.publisher` with the servers'
    settings, in a process of its own that serves nothing."""
    room, feed = room_name(), f"jobs-{uuid.uuid4().hex[:6]}"
    await member.join(room, presence_events=False)
    dashboard = CollabClient(server.ws_url, token=guest_token(server.url, "dash"), endpoint="live")
    await dashboard.connect()
    try:
        subscribed = await dashboard.subscribe(feed)
        assert subscribed["snapshot"] is None
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, room, feed],
            env=server.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        offset, msg_id = done.stdout.split()
        message = await next_checked(member)
        assert message["offset"] == int(offset) == 1 and message["msg_id"] == msg_id
        assert message["user"] == {"id": "service:nightly", "name": "nightly"}
        assert message["body"] == {"text": "from a script"}
        update = await next_checked(dashboard, "/ws/live")
        assert update["type"] == "update" and update["data"] == {"load": 0.25}
        # Exactly once: the retried publish delivered nothing.
        with pytest.raises(TimeoutError):
            await member.next_event(0.5)
        stored = httpx.get(
            f"{server.url}/rooms/{room}/messages", headers=auth(guest_token(server.url))
        ).json()["messages"]
        assert [m["msg_id"] for m in stored] == [msg_id]
    finally:
        await dashboard.close()


async def test_a_celery_task_reaches_a_browserless_client(
    server: ServerProcess, tmp_path: Path, member: CollabClient
) -> None:
    """A real Celery worker runs a task that publishes with `collab.publisher`; a
    `collab.client` member gets the message. The task run twice (a retried task) publishes
    once."""
    room = room_name()
    await member.join(room, presence_events=False)
    redis_url = server.env["COLLAB_BROKER_URL"]
    celery_url = redis_url.rsplit("/", 1)[0] + "/1"
    env = {**server.env, "TEST_CELERY_BROKER_URL": celery_url}
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "tests.celery_publish_app", "worker",
         "--pool", "solo", "--without-heartbeat", "--without-gossip", "--without-mingle",
         "--loglevel", "warning"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    log.close()
    try:
        from celery import Celery

        sender = Celery("sender", broker=celery_url)
        # The task twice (a retry), then another: the solo pool runs them in order, so the
        # third one's message right after the first proves the retry published nothing.
        for text, key in (("sent by a task", "a"), ("sent by a task", "a"), ("next", "b")):
            sender.send_task(
                "tests.announce", args=[room, text, f"{key}-{room}"], queue="collab.test.publish"
            )
        first, second = await member.next_event(30), await member.next_event(30)
        for message in (first, second):
            check_frame("/ws/chat", message)
        assert first["type"] == "message" and first["offset"] == 1
        assert first["user"] == {"id": "service:celery", "name": "celery"}
        assert first["body"] == {"text": "sent by a task"}
        assert (second["offset"], second["body"]) == (2, {"text": "next"})
        sender.close()
    finally:
        worker.terminate()
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)


def test_memory_broker_is_refused_outside_the_server(tmp_path: Path) -> None:
    from collab.publisher import Publisher
    from collab.settings import Settings

    settings = Settings(
        env="test",
        broker_url="memory://",
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'x.db'}",
        secret_key="p" * 40,
    )
    with pytest.raises(ValueError, match="redis"):
        Publisher(settings)
