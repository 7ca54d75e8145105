"""The shipped NGINX configuration in front of two real hub nodes: TLS, WebSocket upgrade,
balancing without sticky sessions, and a room that spans both nodes."""

from __future__ import annotations

import shutil
import ssl
import string
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import ServerProcess, server_env
from tests.services import IN_CI, REDIS_URL, free_port, redis_db_url, require
from tests.wsclient import Client

pytestmark = [pytest.mark.slow, pytest.mark.redis]

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "collab.crt", folder / "collab.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    if NGINX is None:
        if IN_CI:
            pytest.fail("nginx is missing; .ci/run installs it")
        pytest.skip("nginx is not installed")
    require(REDIS_URL, 6379, "Redis")
    folder = tmp_path_factory.mktemp("nginx")
    broker = redis_db_url(13)
    import redis

    redis.Redis.from_url(broker).flushdb()
    nodes = [
        ServerProcess(
            server_env(folder, {"COLLAB_BROKER_URL": broker, "COLLAB_NODE_ID": f"hub{i}"}),
            folder / f"hub{i}.log",
        ).start()
        for i in (1, 2)
    ]
    cert, key = _self_signed(folder)
    http_port, https_port = free_port(), free_port()
    site = string.Template((DEPLOY / "nginx" / "collab.conf.template").read_text())
    rendered = site.safe_substitute(
        COLLAB_UPSTREAMS=" ".join(f"server 127.0.0.1:{n.port} max_fails=0;" for n in nodes),
        NGINX_SERVER_NAME="localhost",
        NGINX_HTTP_PORT=str(http_port),
        NGINX_HTTPS_PORT=str(https_port),
        NGINX_CERT=str(cert),
        NGINX_KEY=str(key),
        NGINX_ACCESS_LOG=str(folder / "access.log"),
        NGINX_WS_CONNECTIONS_PER_ADDRESS="100",
        NGINX_ACME_ROOT=str(folder / "acme"),
    )
    (folder / "collab.conf").write_text(rendered)
    (folder / "nginx.conf").write_text(
        f"""daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/collab.conf;
}}
"""
    )
    nginx = subprocess.Popen(
        [NGINX, "-c", str(folder / "nginx.conf"), "-p", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    context = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"https://localhost:{https_port}/healthz", verify=context, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or nginx.poll() is not None:
                    raise RuntimeError((folder / "error.log").read_text()) from None
                time.sleep(0.1)
        yield {"https": https_port, "http": http_port, "ssl": context, "nodes": nodes}
    finally:
        nginx.terminate()
        nginx.wait(10)
        for node in nodes:
            node.stop()


def test_plain_http_redirects_to_https(stack: dict[str, object]) -> None:
    response = httpx.get(f"http://127.0.0.1:{stack['http']}/healthz", follow_redirects=False)
    assert response.status_code == 301
    assert response.headers["location"].startswith("https://")


async def test_websockets_through_nginx_span_both_nodes(stack: dict[str, object]) -> None:
    base = f"https://localhost:{stack['https']}"
    context = stack["ssl"]
    assert isinstance(context, ssl.SSLContext)
    room = f"tls-{uuid.uuid4().hex[:8]}"
    clients = []
    for i in range(4):
        token = httpx.post(f"{base}/auth/guest", json={"name": f"u{i}"}, verify=context).json()
        client = await Client.connect(
            f"wss://localhost:{stack['https']}", token["access_token"], ssl=context
        )
        await client.request({"type": "join", "room": room})
        clients.append(client)
    # least_conn spreads four connections over both nodes.
    assert {c.welcome["node"] for c in clients} == {"hub1", "hub2"}
    ack = await clients[0].request({"type": "publish", "room": room, "body": {"text": "hi"}})
    for client in clients:
        message = await client.event("message", room=room)
        assert message["offset"] == ack["offset"] and message["body"] == {"text": "hi"}
