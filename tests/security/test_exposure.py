"""Issue 15, Low and Medium: what strangers could reach. `/metrics` was public through NGINX,
the Celery worker's metrics listened on every interface, any guest could list every user with
their role, and one client address could hold any number of WebSockets through the proxy."""

from __future__ import annotations

import socket
import ssl
import time
from pathlib import Path

import httpx
import pytest

from loadtests.isolated import WorkerProcess
from tests.helpers import eventually
from tests.processes import RedisServer, require_redis_server, server_env
from tests.security.common import bearer, running_server, ws_outcome
from tests.security.proxy import nginx_in_front
from tests.services import free_port

pytestmark = pytest.mark.slow


def _outside_address() -> str:
    """An address of this machine that is not loopback: a request to it comes from outside
    NGINX's allow-list, as a stranger's would."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("192.0.2.1", 9))  # no packet is sent; this only picks a route
            address = str(probe.getsockname()[0])
        except OSError:
            address = ""
    if not address or address.startswith("127."):
        pytest.skip("this machine has no address other than loopback")
    return address


def _listens(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


def test_guests_cannot_list_users(tmp_path: Path) -> None:
    with running_server(tmp_path) as server, httpx.Client(base_url=server.url) as http:
        token = http.post("/auth/guest", json={"name": "g"}).json()["access_token"]
        assert http.get("/users", headers=bearer(token)).status_code == 403
        me = http.get("/users/me", headers=bearer(token))
        assert me.status_code == 200 and me.json()["is_guest"] is True


async def test_nginx_keeps_metrics_in_and_caps_websockets_per_address(tmp_path: Path) -> None:
    outside = _outside_address()
    with (
        running_server(tmp_path, name="hub") as server,
        nginx_in_front(tmp_path, [server.port], ws_per_address=2) as proxy,
    ):
        loose = ssl.create_default_context(cafile=str(tmp_path / "collab.crt"))
        loose.check_hostname = False  # the certificate names localhost, not this address
        stranger = f"https://{outside}:{proxy.https_port}"
        assert httpx.get(f"{stranger}/healthz", verify=loose).status_code == 200
        assert httpx.get(f"{stranger}/metrics", verify=loose).status_code == 403
        assert httpx.get(f"{proxy.url}/metrics", verify=proxy.context).status_code == 200

        token = httpx.post(
            f"{proxy.url}/auth/guest", json={"name": "g"}, verify=proxy.context
        ).json()["access_token"]
        from websockets.asyncio.client import connect

        url = f"{proxy.ws_url}/ws/chat?token={token}"
        async with (
            connect(url, ssl=proxy.context, compression=None),
            connect(url, ssl=proxy.context, compression=None),
        ):
            assert await ws_outcome(url, proxy.context) == 429

        # The count is of open connections: once NGINX has seen those two end, one gets in.
        async def admitted() -> bool:
            return await ws_outcome(url, proxy.context) == "welcome"

        await eventually(admitted, 10, "a WebSocket through NGINX after the others closed")


def test_worker_metrics_listen_on_loopback_only(tmp_path: Path) -> None:
    require_redis_server()
    outside = _outside_address()
    broker = RedisServer(tmp_path)
    broker.start()
    port = free_port()
    worker = WorkerProcess(
        server_env(
            tmp_path,
            {
                "COLLAB_CELERY_BROKER_URL": broker.url,
                "COLLAB_CELERY_METRICS_PORT": str(port),
            },
        ),
        tmp_path / "worker.log",
        concurrency=1,
    )
    try:
        worker.start()
        deadline = time.monotonic() + 20
        while not _listens("127.0.0.1", port):
            assert time.monotonic() < deadline, worker.log()
            time.sleep(0.1)
        assert httpx.get(f"http://127.0.0.1:{port}/metrics").status_code == 200
        assert not _listens(outside, port)
    finally:
        worker.kill()
        broker.kill()
