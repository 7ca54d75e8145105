"""The production entry point: Gunicorn with the shipped config and Collab's worker class."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.processes import server_env
from tests.services import free_port
from tests.wsclient import Client

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parent.parent / "deploy" / "gunicorn.conf.py"


@pytest.mark.redis
async def test_gunicorn_serves_rest_and_websockets_and_stops_with_1001(
    tmp_path: Path, redis_url: str
) -> None:
    gunicorn = shutil.which("gunicorn")
    assert gunicorn, "gunicorn is part of the production extra"
    port = free_port()
    env = server_env(
        tmp_path,
        {
            "COLLAB_ENV": "production",
            "COLLAB_SECRET_KEY": "production-test-secret-" + "q" * 30,
            "COLLAB_ALLOWED_ORIGINS": "https://chat.example.com",
            "COLLAB_BIND": f"127.0.0.1:{port}",
            "COLLAB_WORKERS": "2",  # two nodes: they share rooms through Redis
            "COLLAB_BROKER_URL": redis_url,
            "COLLAB_AUTO_MIGRATE": "true",
        },
    )
    migrate = subprocess.run(
        ["python", "-m", "collab", "migrate"], env=env, capture_output=True, timeout=60, check=False
    )
    assert migrate.returncode == 0, migrate.stderr
    log = (tmp_path / "gunicorn.log").open("wb")
    process = subprocess.Popen(
        [gunicorn, "-c", str(CONFIG)], env=env, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()
            time.sleep(0.2)
        token = httpx.post(f"{base}/auth/guest", json={"name": "ann"}).json()["access_token"]
        client = await Client.connect(f"ws://127.0.0.1:{port}", token)
        assert client.welcome["type"] == "welcome"
        await client.request({"type": "join", "room": "general"})
        os.kill(process.pid, signal.SIGTERM)
        assert await client.closed_with(timeout=20) == 1001
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
        log.close()


@pytest.mark.parametrize("server", ["collab", "gunicorn"])
def test_several_processes_on_the_memory_broker_are_refused(tmp_path: Path, server: str) -> None:
    """Two processes on the embedded broker would be two servers under one address: each
    room twice, with repeated offsets. They refuse to start, and say what to set."""
    port = free_port()
    env = server_env(tmp_path, {"COLLAB_BIND": f"127.0.0.1:{port}", "COLLAB_WORKERS": "2"})
    command = (
        [sys.executable, "-m", "collab", "serve", "--workers", "2", "--port", str(port)]
        if server == "collab"
        else [shutil.which("gunicorn") or "gunicorn", "-c", str(CONFIG)]
    )
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "COLLAB_BROKER_URL=redis://" in output and "2 server processes" in output
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
