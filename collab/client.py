"""An asyncio client for Collab's wire protocol (docs/PROTOCOL.md), for services, bots, tests.

It keeps one WebSocket open for as long as it is not closed: it reconnects with capped,
jittered backoff, rejoins every room and feed with the last position it saw (so the server
hands over exactly what was missed), drops duplicates by offset, and publishes idempotently
(every publish carries a `client_msg_id`, and a publish whose reply was lost or whose outcome
was unknown is sent again with the same id, so it is delivered once).

    from collab.client import CollabClient

    async with CollabClient("ws://127.0.0.1:8000", token=token) as client:
        await client.join("general")
        await client.publish("general", {"text": "hi"})
        async for event in client.events():
            if event["type"] == "message":
                print(event["user"]["name"], event["body"])

The same behaviour as the JavaScript package in `clients/js/`; docs/CLIENTS.md has more.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, Literal

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

__all__ = [
    "CollabClient",
    "CollabError",
    "ConnectionLost",
    "Frame",
    "RequestTimeout",
    "State",
    "guest_token",
]

log = logging.getLogger("collab.client")

Frame = dict[str, Any]
State = Literal["connecting", "connected", "disconnected", "reconnecting", "closed"]
TokenSource = Callable[[], Awaitable[str] | str]
StateListener = Callable[[State, dict[str, Any]], None]

# Close codes after which trying again cannot help (PROTOCOL.md, "Close codes"): the origin
# is refused, the user has too many connections, or the client sends frames too large.
_FINAL_CLOSES = {1000, 1009, 4403, 4429}
_UNAUTHORIZED = 4401
_PUBLISH_RETRIES = 5


class CollabError(Exception):
    """An `error` reply: the command failed (`code`), unless `outcome` is "unknown"."""

    def __init__(self, frame: Frame) -> None:
        super().__init__(f"{frame.get('code')}: {frame.get('message')}")
        self.frame = frame
        self.code: str = str(frame.get("code"))
        self.outcome: str | None = frame.get("outcome")


class ConnectionLost(Exception):
    """The connection went away before the reply came; the command may or may not have run."""


class RequestTimeout(TimeoutError):
    """No reply within the request timeout."""


class CollabClient:
    """One logical connection to `/ws/chat` or `/ws/live`, kept open until `close`.

    `token` or `get_token` (a function, plain or async, returning a bearer token) says who
    connects; `get_token` is called before every connect and again after a 4401, so a token
    that expired is replaced rather than ending the session. The token travels in the
    `Authorization` header, never in the URL.
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        get_token: TokenSource | None = None,
        endpoint: Literal["chat", "live"] = "chat",
        request_timeout: float = 10.0,
        backoff_min: float = 0.25,
        backoff_max: float = 30.0,
        on_state: StateListener | None = None,
    ) -> None:
        if token is None and get_token is None:
            raise ValueError("give a token or get_token")
        base = url.rstrip("/")
        if base.startswith("http"):
            base = "ws" + base[len("http") :]
        self.url = f"{base}/ws/{endpoint}"
        self.endpoint = endpoint
        self.request_timeout = request_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self._token = token
        self._get_token = get_token
        self._listeners: list[StateListener] = [on_state] if on_state else []
        self.state: State = "disconnected"
        self.welcome: Frame = {}
        # Rooms or feeds this client is in, with the join options; rejoined on reconnect.
        self._joined: dict[str, Frame] = {}
        # The last (epoch, offset) seen per room or feed: the `since` of a rejoin.
        self.positions: dict[str, tuple[str, int]] = {}
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[Frame]] = {}
        self._events: asyncio.Queue[Frame] = asyncio.Queue()
        self._ws: ClientConnection | None = None
        self._ready = asyncio.Event()  # set while connected and rejoined
        self._runner: asyncio.Task[None] | None = None
        self._closed = False
        self._failure: BaseException | None = None  # why the client gave up for good

    # -- lifecycle -------------------------------------------------------------------------

    async def connect(self) -> CollabClient:
        """Start, and wait for the first connection (raises if it is refused for good)."""
        if self._runner is None:
            self._runner = asyncio.get_running_loop().create_task(self._run())
        await self._wait_ready()
        return self

    async def close(self) -> None:
        """Close for good: pending requests fail with `ConnectionLost`."""
        self._closed = True
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        self._fail_pending(ConnectionLost("client closed"))
        self._set_state("closed", {})

    async def __aenter__(self) -> CollabClient:
        return await self.connect()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def on_state(self, listener: StateListener) -> None:
        """Call `listener(state, info)` on every change: connecting, connected, disconnected
        (info: `code`, `reason`), reconnecting (info: `delay` in seconds), closed."""
        self._listeners.append(listener)

    # -- commands --------------------------------------------------------------------------

    async def join(self, room: str, *, presence_events: bool = True) -> Frame:
        """Join `room`; the `joined` reply. Rejoined, with recovery, after every reconnect."""
        options: Frame = {} if presence_events else {"presence_events": False}
        reply = await self.request({"type": "join", "room": room, **options})
        self._joined[room] = options
        self._after_join(room, reply)
        return reply

    async def leave(self, room: str) -> Frame:
        self._joined.pop(room, None)
        self.positions.pop(room, None)
        return await self.request({"type": "leave", "room": room})

    async def subscribe(self, feed: str) -> Frame:
        """Subscribe to `feed` (on `/ws/live`); the `subscribed` reply, with its snapshot."""
        reply = await self.request({"type": "subscribe", "feed": feed})
        self._joined[feed] = {}
        self._after_join(feed, reply)
        return reply

    async def unsubscribe(self, feed: str) -> Frame:
        self._joined.pop(feed, None)
        self.positions.pop(feed, None)
        return await self.request({"type": "unsubscribe", "feed": feed})

    async def publish(
        self, room: str, body: dict[str, Any], *, client_msg_id: str | None = None
    ) -> Frame:
        """Publish `body` to a joined room; the `ack` (stored, with its offset and msg_id).

        Idempotent: sent with a `client_msg_id` (made up when not given), and sent again with
        the same id after a lost connection (once reconnected and rejoined), an
        `outcome: "unknown"` or a `delivery: "unknown"` error, so the room gets it exactly
        once. Waits while disconnected. Raises `CollabError` for a refusal, `RequestTimeout`
        when a reply does not come in time (retrying with the same `client_msg_id` is then
        safe).
        """
        command: Frame = {
            "type": "publish",
            "room": room,
            "body": body,
            "client_msg_id": client_msg_id or uuid.uuid4().hex,
        }
        unconfirmed = 0
        uncertain: CollabError | None = None  # the last reply that left the outcome unknown
        while True:
            try:
                return await self.request(command)
            except ConnectionLost:
                if self._closed or self._failure is not None:
                    raise
                continue  # sent again once reconnected: the same id, so at most once
            except CollabError as exc:
                if exc.outcome == "unknown" or exc.frame.get("delivery") == "unknown":
                    # Delivered but not confirmed stored, or maybe delivered (the broker's
                    # reply was lost): the same id gets the first message's ack if it went
                    # out, and publishes it otherwise; nothing is delivered twice.
                    uncertain = exc
                elif uncertain is None:
                    raise
                elif exc.code not in ("unavailable", "rate_limited"):
                    # A retry refused for another reason says nothing of the first attempt,
                    # which may have gone out: the outcome is still the unknown one.
                    raise uncertain from None
                # (Otherwise a retry was answered "not done": that retry did not run, but the
                # first attempt may have, so the outcome stays unknown and the retries go on.)
                if unconfirmed >= _PUBLISH_RETRIES:
                    raise uncertain from None
                unconfirmed += 1
                await asyncio.sleep(self._backoff(unconfirmed))

    async def typing(self, room: str) -> None:
        await self._send({"type": "typing", "room": room})

    async def history(self, room: str, *, before: int | None = None, limit: int = 50) -> Frame:
        command: Frame = {"type": "history", "room": room, "limit": limit}
        if before is not None:
            command["before"] = before
        return await self.request(command)

    async def presence(self, room: str) -> Frame:
        return await self.request({"type": "presence", "room": room})

    async def ping(self) -> Frame:
        return await self.request({"type": "ping"})

    async def request(self, command: Frame) -> Frame:
        """Send `command` with a fresh id once connected; its reply (an `error` raises).

        A command refused as `rate_limited` (not carried out) is sent again at the server's
        pace (`welcome.limits.rate`), for up to `request_timeout`: joining fifty rooms or
        publishing a burst in one go goes through, a little later, instead of failing past
        the server's burst. Raises `RequestTimeout` when no reply comes within
        `request_timeout` of sending, `ConnectionLost` when the connection drops first.
        """
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        while True:
            await self._wait_ready()
            try:
                return await self._request_now(command)
            except CollabError as exc:
                if exc.code != "rate_limited":
                    raise
                # Jittered, so that commands refused together do not all come back together.
                wait = (1 + random.random()) / self._rate()
                if asyncio.get_running_loop().time() + wait > deadline:
                    raise
                await asyncio.sleep(wait)

    def _rate(self) -> float:
        """The server's command rate per second, as its welcome says (20 if it does not)."""
        return float((self.welcome.get("limits") or {}).get("rate") or 0) or 20.0

    async def events(self) -> AsyncIterator[Frame]:
        """Events in arrival order: `message`, `update`, `typing`, `presence_diff`, and after
        a reconnect the `joined`/`subscribed` reply of each rejoin (its `recovered` false
        means a gap: reload history), and `error` replies with a null id. Duplicates (by
        offset) are dropped. Events are kept until read: a client that never reads them
        should join with `presence_events=False` and expect its memory to grow with traffic."""
        while True:
            yield await self._events.get()

    async def next_event(self, wait: float | None = None) -> Frame:
        """The next event, waiting at most `wait` seconds (`TimeoutError` after)."""
        return await asyncio.wait_for(self._events.get(), wait)

    # -- internals -------------------------------------------------------------------------

    async def _wait_ready(self) -> None:
        if self._runner is None:
            raise RuntimeError("connect() first")
        ready = asyncio.ensure_future(self._ready.wait())
        try:
            await asyncio.wait({ready, self._runner}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            ready.cancel()
        if self._failure is not None:
            raise ConnectionLost(str(self._failure)) from self._failure
        if self._closed or not self._ready.is_set():
            raise ConnectionLost("client closed")

    async def _request_now(self, command: Frame) -> Frame:
        ws = self._ws
        if ws is None:
            raise ConnectionLost("not connected")
        command_id = next(self._ids)
        future: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._pending[command_id] = future
        try:
            await ws.send(orjson.dumps({**command, "id": command_id}).decode())
            reply = await asyncio.wait_for(asyncio.shield(future), self.request_timeout)
        except ConnectionClosed as exc:
            raise ConnectionLost(str(exc)) from None
        except TimeoutError:
            raise RequestTimeout(
                f"no reply to {command.get('type')} within {self.request_timeout}s"
            ) from None
        finally:
            self._pending.pop(command_id, None)
        if reply.get("type") == "error":
            raise CollabError(reply)
        return reply

    async def _send(self, command: Frame) -> None:
        await self._wait_ready()
        assert self._ws is not None
        try:
            await self._ws.send(orjson.dumps(command).decode())
        except ConnectionClosed as exc:
            raise ConnectionLost(str(exc)) from None

    async def _token_now(self) -> str:
        if self._get_token is None:
            assert self._token is not None
            return self._token
        token = self._get_token()
        return await token if not isinstance(token, str) else token

    def _backoff(self, attempt: int) -> float:
        # Full jitter, so that clients dropped together do not come back together.
        ceiling = min(self.backoff_max, self.backoff_min * 2.0 ** max(0, attempt - 1))
        return float(ceiling * (0.5 + random.random() / 2))

    async def _run(self) -> None:
        """Connect, serve, and reconnect until closed or refused for good."""
        attempt = 0
        while not self._closed:
            self._set_state("connecting", {"attempt": attempt})
            code, reason = 1006, ""
            try:
                token = await self._token_now()
                async with connect(
                    self.url,
                    additional_headers={"Authorization": f"Bearer {token}"},
                    compression=None,
                    open_timeout=self.request_timeout,
                    max_size=None,
                ) as ws:
                    self._ws = ws
                    code, reason = await self._serve(ws)
                    attempt = 0 if self.welcome else attempt
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                reason = str(exc)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a get_token that failed, say: try again later
                log.warning("collab client: connect failed: %s", exc)
                reason = str(exc)
            finally:
                self._ws = None
                self._ready.clear()
                self._fail_pending(ConnectionLost(f"connection closed ({code})"))
            if self._closed:
                return
            self._set_state("disconnected", {"code": code, "reason": reason})
            if code in _FINAL_CLOSES or (code == _UNAUTHORIZED and self._get_token is None):
                self._failure = ConnectionLost(f"closed with {code} {reason}".strip())
                self._set_state("closed", {"code": code, "reason": reason})
                return
            attempt += 1
            delay = self._backoff(attempt)
            self._set_state("reconnecting", {"delay": delay, "attempt": attempt})
            await asyncio.sleep(delay)

    async def _serve(self, ws: ClientConnection) -> tuple[int, str]:
        """Read frames until the connection closes; its close code and reason."""
        self.welcome = {}
        rejoin: asyncio.Task[None] | None = None
        try:
            while True:
                raw = await ws.recv()
                frame: Frame = orjson.loads(raw)
                if frame.get("type") == "welcome" and not self.welcome:
                    self.welcome = frame
                    rejoin = asyncio.get_running_loop().create_task(self._rejoin())
                    continue
                self._on_frame(frame)
        except ConnectionClosed as exc:
            return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
        finally:
            if rejoin is not None and not rejoin.done():
                rejoin.cancel()

    async def _rejoin(self) -> None:
        """After a (re)connect: every room and feed again, from the last position seen.

        Only a refusal (`forbidden`, `too_many_channels`...) drops a room. A rejoin answered
        `rate_limited` (more rooms than the server's burst) waits for the server's rate and
        goes on; one answered `unavailable` (the broker is away, or a Redis Cluster shard is
        failing over) is tried again with backoff, so a client that reconnects during an
        outage is back in all its rooms once it ends. Until then the client is not ready:
        what it sends waits, as while disconnected.
        """
        rate = self._rate()
        for name, options in list(self._joined.items()):
            command: Frame = (
                {"type": "join", "room": name, **options}
                if self.endpoint == "chat"
                else {"type": "subscribe", "feed": name}
            )
            outages = 0
            while True:
                seen = self.positions.get(name)
                if seen is not None:
                    command["since"] = {"epoch": seen[0], "offset": seen[1]}
                try:
                    reply = await self._request_now(command)
                except CollabError as exc:
                    if exc.code == "rate_limited":
                        await asyncio.sleep(1.0 / rate)
                        continue
                    if exc.code == "unavailable":
                        outages += 1
                        log.info("collab client: rejoining %s: %s; trying again", name, exc)
                        await asyncio.sleep(self._backoff(outages))
                        continue
                    log.warning("collab client: rejoining %s failed: %s", name, exc)
                    self._joined.pop(name, None)
                    self._events.put_nowait({**exc.frame, "rejoin": name})
                    break
                except ConnectionLost:
                    return  # the connection is going; the next one rejoins
                except RequestTimeout:
                    # No reply on a socket that is still open: a wedged server or a network
                    # that drops everything. Waiting on it would leave the client never
                    # ready; a new connection rejoins.
                    if self._ws is not None:
                        self._ws.transport.abort()
                    return
                self._after_join(name, reply)
                self._events.put_nowait(reply)
                break
        self._ready.set()
        self._set_state("connected", {"welcome": self.welcome})

    def _after_join(self, name: str, reply: Frame) -> None:
        for frame in reply.get("missed") or []:
            self._on_frame(frame)
        seen = self.positions.get(name)
        if seen is None or seen[0] != reply["epoch"] or seen[1] < reply["offset"]:
            self.positions[name] = (reply["epoch"], reply["offset"])

    def _on_frame(self, frame: Frame) -> None:
        if "id" in frame:
            future = self._pending.get(frame["id"])
            if future is not None and not future.done():
                future.set_result(frame)
            elif frame["id"] is None:
                # An error for a frame the server could not tie to a command (rate limited
                # without an id, say): nobody waits for it, so it goes with the events.
                self._events.put_nowait(frame)
            return
        kind = frame.get("type")
        if kind in ("message", "update"):
            name = frame.get("room") if kind == "message" else frame.get("feed")
            seen = self.positions.get(name) if isinstance(name, str) else None
            if seen is not None and seen[0] == frame["epoch"] and frame["offset"] <= seen[1]:
                return  # already seen: recovery and the live stream overlapped
            if isinstance(name, str):
                self.positions[name] = (frame["epoch"], frame["offset"])
        self._events.put_nowait(frame)

    def _fail_pending(self, error: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(error)

    def _set_state(self, state: State, info: dict[str, Any]) -> None:
        self.state = state
        for listener in self._listeners:
            try:
                listener(state, info)
            except Exception:
                log.exception("collab client: state listener failed")


async def guest_token(base_url: str, name: str) -> str:
    """A guest token from `POST /auth/guest` (development servers; off in production)."""
    http = base_url.rstrip("/").replace("ws://", "http://", 1).replace("wss://", "https://", 1)

    def fetch() -> str:
        request = urllib.request.Request(  # noqa: S310 - the caller's own server
            f"{http}/auth/guest",
            data=orjson.dumps({"name": name}),
            headers={"content-type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            token: str = orjson.loads(response.read())["access_token"]
            return token

    return await asyncio.to_thread(fetch)
