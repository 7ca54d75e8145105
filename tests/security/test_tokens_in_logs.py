"""Issue 15, High: bearer tokens in production logs. Under Gunicorn with the shipped config
uvicorn logged `WebSocket /ws/chat?token=<the whole JWT>`; NGINX logged it too. And a browser
had no way to connect without putting its long-lived token in a URL."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import eventually
from tests.processes import server_env
from tests.security.common import bearer, running_server, ws_outcome
from tests.security.proxy import nginx_in_front
from tests.services import free_port

pytestmark = pytest.mark.slow
CONFIG = Path(__file__).resolve().parents[2] / "deploy" / "gunicorn.conf.py"


async def _connect_every_way(
    base_url: str, ws_url: str, log: Path, tls: ssl.SSLContext | None = None
) -> tuple[str, str]:
    """Connect with `?token=`, check the log, then with a ticket; the token and ticket used."""
    with httpx.Client(base_url=base_url, verify=tls or True, timeout=10) as http:
        token = http.post("/auth/guest", json={"name": "ann"}).json()["access_token"]
        assert await ws_outcome(f"{ws_url}/ws/chat?token={token}", tls) == "welcome"

        async def logged() -> bool:
            return "/ws/chat" in log.read_text(errors="replace")

        await eventually(logged, 10, "the WebSocket's line in the log")
        _assert_not_in(token, log)

        issued = http.post("/auth/ws-ticket", headers=bearer(token))
        assert issued.status_code == 200, issued.text
        ticket = issued.json()["ticket"]
        assert 1 <= issued.json()["expires_in"] <= 300
        assert await ws_outcome(f"{ws_url}/ws/live?ticket={ticket}", tls) == "welcome"
        # One use only: the same ticket again is refused like a bad token.
        assert await ws_outcome(f"{ws_url}/ws/chat?ticket={ticket}", tls) == 4401
        assert http.post("/auth/ws-ticket").status_code == 401
    return token, ticket


def _assert_not_in(credential: str, log: Path) -> None:
    written = log.read_text(errors="replace")
    # The whole credential, or a JWT's signature alone (what a log line cut short would keep).
    assert credential not in written, written[-2000:]
    assert credential.split(".")[-1] not in written, written[-2000:]


async def test_gunicorn_logs_no_token(tmp_path: Path) -> None:
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
            "COLLAB_WORKERS": "1",
            "COLLAB_AUTO_MIGRATE": "true",
            "COLLAB_GUEST_ACCESS": "true",
        },
    )
    log_path = tmp_path / "gunicorn.log"
    with log_path.open("wb") as log:
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
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        token, ticket = await _connect_every_way(base, f"ws://127.0.0.1:{port}", log_path)
        # Production serves no API pages unless asked to.
        assert httpx.get(f"{base}/docs").status_code == 404
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        # The whole group: a master killed alone leaves its workers running.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    assert "/ws/chat?token=[redacted]" in log_path.read_text(errors="replace")
    _assert_not_in(token, log_path)
    _assert_not_in(ticket, log_path)


async def test_nginx_logs_no_token(tmp_path: Path) -> None:
    with (
        running_server(tmp_path, name="hub") as server,
        nginx_in_front(tmp_path, [server.port]) as proxy,
    ):
        # NGINX writes a WebSocket's line when it ends, which the connects wait for.
        token, ticket = await _connect_every_way(
            proxy.url, proxy.ws_url, proxy.access_log, proxy.context
        )

        async def logged() -> bool:
            return proxy.access_log.read_text(errors="replace").count("GET /ws/") >= 3

        await eventually(logged, 10, "NGINX access log lines for the WebSockets")
    assert "/auth/ws-ticket" in proxy.access_log.read_text(errors="replace")
    _assert_not_in(token, proxy.access_log)
    _assert_not_in(ticket, proxy.access_log)
