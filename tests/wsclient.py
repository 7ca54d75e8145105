"""A small protocol client for tests: replies matched by id, events kept in arrival order."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable
from typing import Any

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.protocol_schema import check_frame

Frame = dict[str, Any]


class Client:
    _ids = itertools.count(1)
    # Every client a test opened, so a fixture can close what a failing test left open.
    opened: list[Client] = []

    def __init__(self, ws: ClientConnection, path: str = "/ws/chat") -> None:
        self.ws = ws
        self.path = path
        Client.opened.append(self)
        self.frames: list[Frame] = []  # every frame received, in order
        self._unread: list[Frame] = []
        self.welcome: Frame = {}
        # Every frame is checked against the AsyncAPI document, unless a test needs a reader
        # as fast as a real client's (the check costs more than reading the frame).
        self.check_frames = True

    @classmethod
    async def connect(
        cls, base_ws_url: str, token: str | None, path: str = "/ws/chat", **kwargs: Any
    ) -> Client:
        url = f"{base_ws_url}{path}" + (f"?token={token}" if token else "")
        ws = await connect(url, compression=None, open_timeout=10, **kwargs)
        client = cls(ws, path)
        client.welcome = await client.next_frame()
        return client

    def _received(self, raw: str | bytes) -> Frame:
        """Every frame from the server passes here: it must fit the AsyncAPI document."""
        frame: Frame = orjson.loads(raw)
        self.frames.append(frame)
        if self.check_frames:
            check_frame(self.path, frame)
        return frame

    async def send(self, command: Frame | str | bytes) -> None:
        if isinstance(command, dict):
            command = orjson.dumps(command).decode()
        await self.ws.send(command)

    async def next_frame(self, timeout: float = 5.0) -> Frame:
        if self._unread:
            return self._unread.pop(0)
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: Frame = self._received(raw)
        return frame

    async def wait_for(self, match: Callable[[Frame], bool], timeout: float = 5.0) -> Frame:
        """The first frame (read now or earlier and not yet taken) that matches."""
        for i, frame in enumerate(self._unread):
            if match(frame):
                return self._unread.pop(i)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"no matching frame; unread: {self._unread[-5:]}")
            raw = await asyncio.wait_for(self.ws.recv(), remaining)
            frame = self._received(raw)
            if match(frame):
                return frame
            self._unread.append(frame)

    def discard(self, match: Callable[[Frame], bool]) -> None:
        """Forget the frames read earlier and not taken that match."""
        self._unread = [frame for frame in self._unread if not match(frame)]

    async def request(self, command: Frame, timeout: float = 5.0) -> Frame:
        """Send a command with a fresh id; its reply."""
        command_id = next(self._ids)
        await self.send({**command, "id": command_id})
        return await self.wait_for(lambda f: f.get("id") == command_id, timeout)

    async def event(self, kind: str, timeout: float = 5.0, **fields: Any) -> Frame:
        return await self.wait_for(
            lambda f: (
                f.get("type") == kind
                and "id" not in f
                and all(f.get(k) == v for k, v in fields.items())
            ),
            timeout,
        )

    async def messages(self, room: str, count: int, timeout: float = 10.0) -> list[Frame]:
        return [await self.event("message", timeout, room=room) for _ in range(count)]

    async def no_frame(self, match: Callable[[Frame], bool], wait: float = 0.5) -> bool:
        """True when nothing matching arrives within `wait` seconds."""
        try:
            await self.wait_for(match, wait)
        except TimeoutError:
            return True
        return False

    async def closed_with(self, timeout: float = 10.0) -> int | None:
        """Read until the server closes; the close code."""
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self.ws.recv()
                    self._unread.append(self._received(raw))
        except ConnectionClosed as exc:
            return exc.rcvd.code if exc.rcvd else None

    async def close(self) -> None:
        await self.ws.close()

    @classmethod
    async def close_all(cls) -> None:
        clients, cls.opened = cls.opened, []
        for client in clients:
            try:
                await asyncio.wait_for(client.ws.close(), 5)
            except Exception:
                # A client that stopped reading (its queue full of unread frames) never sees
                # the server's close, and a server already stopped never answers: drop the
                # socket rather than leak it.
                client.ws.transport.abort()


def guest_token(base_url: str, name: str = "ann") -> str:
    response = httpx.post(f"{base_url}/auth/guest", json={"name": name}, timeout=10)
    response.raise_for_status()
    token: str = response.json()["access_token"]
    return token


def guest(base_url: str, name: str = "ann") -> tuple[str, str]:
    """A guest's token and user id."""
    response = httpx.post(f"{base_url}/auth/guest", json={"name": name}, timeout=10)
    response.raise_for_status()
    body = response.json()
    return body["access_token"], str(body["user"]["id"])
