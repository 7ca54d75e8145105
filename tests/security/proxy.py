"""The shipped NGINX template, rendered and run in front of real hub nodes, for the probes."""

from __future__ import annotations

import shutil
import ssl
import string
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.services import IN_CI, free_port

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)


@dataclass
class Proxy:
    folder: Path
    https_port: int
    context: ssl.SSLContext

    @property
    def url(self) -> str:
        return f"https://localhost:{self.https_port}"

    @property
    def ws_url(self) -> str:
        return f"wss://localhost:{self.https_port}"

    @property
    def access_log(self) -> Path:
        return self.folder / "access.log"

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, verify=self.context, timeout=10)


def require_nginx() -> str:
    if NGINX is None:
        if IN_CI:
            pytest.fail("nginx is missing; .ci/run installs it")
        pytest.skip("nginx is not installed")
    return NGINX


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "collab.crt", folder / "collab.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@contextmanager
def nginx_in_front(folder: Path, ports: list[int], ws_per_address: int = 100) -> Iterator[Proxy]:
    """NGINX with `deploy/nginx/collab.conf.template`, as the official image renders it."""
    nginx = require_nginx()
    cert, key = _self_signed(folder)
    http_port, https_port = free_port(), free_port()
    template = string.Template((DEPLOY / "nginx" / "collab.conf.template").read_text())
    # safe_substitute: NGINX's own $variables stay; every ${...} of ours must be filled.
    rendered = template.safe_substitute(
        COLLAB_UPSTREAMS=" ".join(f"server 127.0.0.1:{port};" for port in ports),
        NGINX_SERVER_NAME="localhost",
        NGINX_HTTP_PORT=str(http_port),
        NGINX_HTTPS_PORT=str(https_port),
        NGINX_CERT=str(cert),
        NGINX_KEY=str(key),
        NGINX_ACCESS_LOG=str(folder / "access.log"),
        NGINX_WS_CONNECTIONS_PER_ADDRESS=str(ws_per_address),
        NGINX_ACME_ROOT=str(folder / "acme"),
    )
    assert "${" not in rendered, "a template variable the probes do not set"
    (folder / "collab.conf").write_text(rendered)
    (folder / "nginx.conf").write_text(
        f"""daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 1024; }}
http {{
    # As the official image does: an access log for the whole http block, which the template
    # may override but must not need.
    access_log {folder}/access.log combined;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    include {folder}/collab.conf;
}}
"""
    )
    process = subprocess.Popen(
        [nginx, "-c", str(folder / "nginx.conf"), "-p", str(folder)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proxy = Proxy(folder, https_port, ssl.create_default_context(cafile=str(cert)))
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                httpx.get(f"{proxy.url}/healthz", verify=proxy.context, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError((folder / "error.log").read_text()) from None
                time.sleep(0.1)
        yield proxy
    finally:
        process.terminate()
        process.wait(10)
