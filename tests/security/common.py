"""Steps the probes share: a server of one's own, and WebSocket connects that report how they
ended."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.processes import ServerProcess, server_env


@contextmanager
def running_server(
    folder: Path, extra: dict[str, str] | None = None, name: str = "server"
) -> Iterator[ServerProcess]:
    server = ServerProcess(server_env(folder, extra), folder / f"{name}.log")
    try:
        yield server.start()
    finally:
        server.stop()


async def ws_outcome(url: str, ssl_context: ssl.SSLContext | None = None) -> int | str:
    """ "welcome" when the server let the socket in, else its close code or HTTP status."""
    try:
        async with connect(url, compression=None, open_timeout=10, ssl=ssl_context) as ws:
            try:
                frame = orjson.loads(await ws.recv())
            except ConnectionClosed as exc:
                return exc.rcvd.code if exc.rcvd else -1
            return str(frame.get("type"))
    except InvalidStatus as exc:
        return exc.response.status_code


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register_and_login(
    http: httpx.Client, username: str, password: str = "correct horse"
) -> tuple[int, str]:
    created = http.post("/auth/register", json={"username": username, "password": password})
    assert created.status_code == 201, created.text
    token = http.post("/auth/token", data={"username": username, "password": password})
    assert token.status_code == 200, token.text
    return int(created.json()["id"]), str(token.json()["access_token"])
