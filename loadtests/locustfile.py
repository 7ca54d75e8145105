"""Locust users for any Collab deployment: chat over /ws/chat, dashboards on /ws/live, REST.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000

User classes (pick some by naming them after the options, e.g. `... ChatUser`):

- `ChatUser`: gets a guest token, opens `/ws/chat`, joins `--rooms-per-user` rooms drawn from
  `--rooms` rooms by `--room-dist`, and publishes at `--publish-rate` messages a second
  (Poisson arrivals; 0: it only listens, pinging every `--ping-interval` seconds). Every message
  body carries its send time, so every member that receives it records the publish-to-delivery
  latency.
- `RestUser`: items CRUD through the REST API (create, read, list, update, delete).
- `DashboardUser`: opens `/ws/live` and subscribes to feed `items`; the REST users' changes
  arrive there as `{"op", "item"}` updates, and their latency is recorded the same way.

WebSocket events go to Locust's statistics with request type `WS`, like HTTP requests, so they
show in the web UI, the `--csv` files and the `--html` report:

| name | response time | failure |
|---|---|---|
| `connect` / `live connect` | handshake until the `welcome` frame | refused, closed, no welcome |
| `join` / `subscribe` | command until its reply | an `error` reply, no reply in time |
| `publish-ack` | publish until its `ack` | an `error` reply, no ack within `--ack-timeout` |
| `delivery` | publish until a member got it (sender's clock) | out of order (`delivery order`) |
| `update` | REST change until a dashboard received it | an update out of order |
| `ping` | ping until pong | no pong in time |
| `disconnect` | - | the server closed the socket (its close code is the error) |

Latencies that cross machines (a distributed run) are only as good as the clocks' agreement:
run the workers on one machine, or keep their clocks in sync (NTP, sub-millisecond).

Locust runs on gevent, so the WebSocket client is the blocking, gevent-friendly
`websocket-client`: one reader greenlet per socket, no asyncio. The runs we document (scaling
ramp, room fan-out, mixed chat, distributed) are in `loadtests/README.md`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import gevent
import websocket
from gevent.event import AsyncResult
from gevent.lock import Semaphore
from locust import HttpUser, events, task
from locust.env import Environment

try:  # orjson when present (it ships with Collab): less Locust CPU per frame
    import orjson

    def loads(data: str | bytes) -> Any:
        return orjson.loads(data)

    def dumps(value: Any) -> str:
        return orjson.dumps(value).decode()

except ImportError:  # pragma: no cover - plain json works the same, only slower

    def loads(data: str | bytes) -> Any:
        return json.loads(data)

    def dumps(value: Any) -> str:
        return json.dumps(value, separators=(",", ":"))


WS = "WS"
MARK = "lt"  # a body with this key was sent by this load test, with its send time in "sent"


# --- options -----------------------------------------------------------------------------------


@events.init_command_line_parser.add_listener  # type: ignore[untyped-decorator]
def add_options(parser: Any) -> None:
    group = parser.add_argument_group("Collab", "options of loadtests/locustfile.py")
    group.add_argument(
        "--rooms", type=int, default=10, env_var="COLLAB_LT_ROOMS", help="rooms to draw from"
    )
    group.add_argument(
        "--room-dist",
        default="uniform",
        env_var="COLLAB_LT_ROOM_DIST",
        help="how users pick rooms: uniform, zipf[:s] (a few hot rooms; s defaults to 1.1)",
    )
    group.add_argument("--rooms-per-user", type=int, default=1, env_var="COLLAB_LT_ROOMS_PER_USER")
    group.add_argument(
        "--room-prefix", default="lt", env_var="COLLAB_LT_ROOM_PREFIX", help="room names' prefix"
    )
    group.add_argument(
        "--publish-rate",
        type=float,
        default=1.0,
        env_var="COLLAB_LT_PUBLISH_RATE",
        help="messages per second per chat user (0: listen only)",
    )
    group.add_argument(
        "--body-bytes",
        type=int,
        default=64,
        env_var="COLLAB_LT_BODY_BYTES",
        help="text padding in each message body",
    )
    group.add_argument(
        "--presence-events",
        default="true",
        env_var="COLLAB_LT_PRESENCE_EVENTS",
        help="true or false: ask for presence_diff events when joining",
    )
    group.add_argument(
        "--delivery-sample",
        type=float,
        default=1.0,
        env_var="COLLAB_LT_DELIVERY_SAMPLE",
        help="fraction of deliveries recorded in the statistics (big fan-outs: less Locust CPU)",
    )
    group.add_argument("--ack-timeout", type=float, default=10.0, env_var="COLLAB_LT_ACK_TIMEOUT")
    group.add_argument(
        "--ping-interval", type=float, default=10.0, env_var="COLLAB_LT_PING_INTERVAL"
    )
    group.add_argument(
        "--shared-token",
        default="false",
        env_var="COLLAB_LT_SHARED_TOKEN",
        help="true: one guest token per Locust process for all WebSocket users (needs the "
        "server's COLLAB_MAX_CONNECTIONS_PER_USER raised); false: a guest per user",
    )
    group.add_argument("--items-per-user", type=int, default=10, env_var="COLLAB_LT_ITEMS_PER_USER")


def _truthy(value: object) -> bool:
    return str(value).strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Settings:
    rooms: int = 10
    room_dist: str = "uniform"
    rooms_per_user: int = 1
    room_prefix: str = "lt"
    publish_rate: float = 1.0
    body_bytes: int = 64
    presence_events: bool = True
    delivery_sample: float = 1.0
    ack_timeout: float = 10.0
    ping_interval: float = 10.0
    shared_token: bool = False
    items_per_user: int = 10

    @classmethod
    def of(cls, environment: Environment) -> Settings:
        """From the command line (or the web UI, whose values arrive as strings)."""
        options = environment.parsed_options
        if options is None:
            return cls()
        default = cls()
        return cls(
            rooms=max(1, int(getattr(options, "rooms", default.rooms))),
            room_dist=str(getattr(options, "room_dist", default.room_dist)),
            rooms_per_user=max(1, int(getattr(options, "rooms_per_user", 1))),
            room_prefix=str(getattr(options, "room_prefix", default.room_prefix)),
            publish_rate=float(getattr(options, "publish_rate", default.publish_rate)),
            body_bytes=max(0, int(getattr(options, "body_bytes", default.body_bytes))),
            presence_events=_truthy(getattr(options, "presence_events", "true")),
            delivery_sample=float(getattr(options, "delivery_sample", 1.0)),
            ack_timeout=float(getattr(options, "ack_timeout", default.ack_timeout)),
            ping_interval=float(getattr(options, "ping_interval", default.ping_interval)),
            shared_token=_truthy(getattr(options, "shared_token", "false")),
            items_per_user=max(1, int(getattr(options, "items_per_user", 10))),
        )

    def pick_rooms(self, rng: random.Random) -> list[str]:
        """`rooms_per_user` distinct rooms, drawn by `room_dist`."""
        count = min(self.rooms_per_user, self.rooms)
        kind, _, arg = self.room_dist.partition(":")
        if kind == "zipf":
            s = float(arg) if arg else 1.1
            weights = [1.0 / (i + 1) ** s for i in range(self.rooms)]
        elif kind == "uniform":
            weights = [1.0] * self.rooms
        else:
            raise ValueError(f"--room-dist: {self.room_dist!r} is not uniform or zipf[:s]")
        chosen: list[int] = []
        while len(chosen) < count:
            index = rng.choices(range(self.rooms), weights)[0]
            if index not in chosen:
                chosen.append(index)
        return [f"{self.room_prefix}-{i}" for i in chosen]


# --- statistics --------------------------------------------------------------------------------


class ServerError(Exception):
    """An `error` reply, or a close the client did not ask for."""


def record(
    environment: Environment,
    name: str,
    response_time_ms: float,
    *,
    length: int = 0,
    exception: BaseException | None = None,
) -> None:
    environment.events.request.fire(  # type: ignore[no-untyped-call]
        request_type=WS,
        name=name,
        response_time=response_time_ms,
        response_length=length,
        exception=exception,
        context={},
    )


def in_order(
    environment: Environment,
    name: str,
    what: str,
    last: tuple[str, int] | None,
    epoch: str,
    offset: int,
) -> tuple[str, int]:
    """Record failure `name` when `offset` does not follow `last` in the same epoch (a lost or
    reordered frame; a new epoch starts over); the position to remember."""
    if last is not None and last[0] == epoch and offset != last[1] + 1:
        record(
            environment,
            name,
            0,
            exception=ServerError(f"{what}: offset {offset} after {last[1]}"),
        )
    return (epoch, offset)


def since_ms(started: float) -> float:
    return (time.perf_counter() - started) * 1000


# --- one WebSocket -----------------------------------------------------------------------------


@dataclass
class Pending:
    name: str
    started: float
    result: AsyncResult | None  # None: fire-and-forget, the reader records the reply
    # Run by the reader on a successful reply, before it reads the next frame: state that the
    # following events depend on (a room's offset) must be in place before they are handled.
    on_reply: Callable[[dict[str, Any]], None] | None = None


class Session:
    """One WebSocket to Collab: replies matched by id, events to a handler, stats to Locust.

    A reader greenlet reads every frame (answering pings), resolves the pending command with
    the reply's id, and hands events to `on_event`. Commands that need their reply wait for it
    (`request`); publishes do not (`send_command`), and the reader records their acks.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        environment: Environment,
        url: str,
        token: str,
        on_event: Callable[[dict[str, Any], int], None],
        connect_name: str,
    ) -> None:
        self.environment = environment
        self.url = url
        self.token = token
        self.on_event = on_event
        self.connect_name = connect_name
        self.ws: websocket.WebSocket | None = None
        self.pending: dict[int, Pending] = {}
        self.reader: gevent.Greenlet | None = None
        self.closing = False
        self.welcome: dict[str, Any] = {}

    @property
    def alive(self) -> bool:
        return self.ws is not None and self.ws.connected and not self.closing

    def connect(self, timeout: float = 10.0) -> bool:
        started = time.perf_counter()
        try:
            ws = websocket.create_connection(
                self.url,
                timeout=timeout,
                header=[f"Authorization: Bearer {self.token}"],
                enable_multithread=True,
            )
            opcode, data = ws.recv_data()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise ServerError(f"closed with {_close_code(data)} instead of welcome")
            welcome = loads(data)
            if welcome.get("type") != "welcome":
                raise ServerError(f"first frame is not welcome: {welcome.get('type')}")
        except Exception as exc:  # a failed connect is a failure in the statistics
            record(self.environment, self.connect_name, since_ms(started), exception=exc)
            return False
        record(self.environment, self.connect_name, since_ms(started), length=len(data))
        ws.settimeout(None)  # the reader waits as long as it takes; the server pings
        self.ws, self.welcome, self.closing = ws, welcome, False
        self.reader = gevent.spawn(self._read)
        return True

    def send_command(self, command: dict[str, Any], name: str) -> int:
        """Send without waiting; the reader records the reply under `name`."""
        command_id = next(self._ids)
        self.pending[command_id] = Pending(name, time.perf_counter(), None)
        self._send({**command, "id": command_id}, name, command_id)
        return command_id

    def request(
        self,
        command: dict[str, Any],
        name: str,
        timeout: float,
        on_reply: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any] | None:
        """Send and wait for the reply; recorded under `name`. None when it failed."""
        command_id = next(self._ids)
        pending = Pending(name, time.perf_counter(), AsyncResult(), on_reply)
        self.pending[command_id] = pending
        if not self._send({**command, "id": command_id}, name, command_id):
            return None
        assert pending.result is not None
        try:
            reply: dict[str, Any] = pending.result.get(timeout=timeout)
        except gevent.Timeout:
            self.pending.pop(command_id, None)
            record(
                self.environment,
                name,
                since_ms(pending.started),
                exception=TimeoutError(f"no reply in {timeout:g}s"),
            )
            return None
        except ServerError:
            return None  # the reader recorded it
        return reply

    def _send(self, command: dict[str, Any], name: str, command_id: int) -> bool:
        try:
            assert self.ws is not None
            self.ws.send(dumps(command))
        except Exception as exc:  # a dead socket: the reader reports the disconnect
            self.pending.pop(command_id, None)
            record(self.environment, name, 0, exception=exc)
            return False
        return True

    def expire(self, timeout: float) -> None:
        """Fire-and-forget commands with no reply after `timeout` seconds are failures."""
        now = time.perf_counter()
        for command_id, pending in list(self.pending.items()):
            if pending.result is None and now - pending.started > timeout:
                del self.pending[command_id]
                record(
                    self.environment,
                    pending.name,
                    (now - pending.started) * 1000,
                    exception=TimeoutError(f"no reply in {timeout:g}s"),
                )

    def _read(self) -> None:
        ws = self.ws
        assert ws is not None
        while True:
            try:
                opcode, data = ws.recv_data()
            except Exception as exc:  # the socket is gone (closed by us or by the network)
                self._lost(exc)
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self._lost(ServerError(f"closed by the server with {_close_code(data)}"))
                return
            try:
                frame = loads(data)
            except ValueError:
                continue
            command_id = frame.get("id")
            pending = self.pending.pop(command_id, None) if command_id is not None else None
            if pending is None:
                self.on_event(frame, len(data))
                continue
            failed = frame.get("type") == "error"
            error = ServerError(f"{frame.get('code')}: {frame.get('message')}") if failed else None
            record(
                self.environment,
                pending.name,
                since_ms(pending.started),
                length=len(data),
                exception=error,
            )
            if error is None and pending.on_reply is not None:
                pending.on_reply(frame)
            if pending.result is not None:
                if error is not None:
                    pending.result.set_exception(error)
                else:
                    pending.result.set(frame)

    def _lost(self, exc: BaseException) -> None:
        if not self.closing:
            record(self.environment, "disconnect", 0, exception=exc)
        self.closing = True
        for pending in self.pending.values():
            if pending.result is not None and not pending.result.ready():
                pending.result.set_exception(ServerError("disconnected"))
        self.pending.clear()

    def close(self) -> None:
        self.closing = True
        # The reader first: two greenlets must not read one socket (close reads the reply).
        if self.reader is not None:
            self.reader.kill(block=True, timeout=1)
        if self.ws is not None:
            with contextlib.suppress(Exception):  # a socket that is already gone
                self.ws.close(timeout=1)


def _close_code(data: bytes) -> int | None:
    return int.from_bytes(data[:2], "big") if len(data) >= 2 else None


def ws_url(host: str, path: str) -> str:
    """`http://h:p/prefix` -> `ws://h:p/prefix/ws/chat` (https -> wss)."""
    parts = urlsplit(host)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))


# --- tokens ------------------------------------------------------------------------------------


_shared_tokens: dict[str, str] = {}
_shared_lock = Semaphore()
_names = itertools.count(1)


def guest_token(user: HttpUser, shared: bool) -> str | None:
    """A guest token from `POST /auth/guest` (recorded as an HTTP request), or the process's
    shared one.

    The server limits token requests per client address (`COLLAB_AUTH_RATE_LIMIT`, 5 a second
    by default); a ramp of many users from one machine meets that limit. A 429 is the server
    working as configured, so it is retried (as its `Retry-After` says, for up to 30 seconds)
    and recorded as a success under its own name; raise the limit or use `--shared-token` for
    big ramps.
    """

    def fetch() -> str | None:
        name = f"lt-{os.getpid() % 10000}-{next(_names)}"
        deadline = time.monotonic() + 30.0
        while True:
            with user.client.post(
                "/auth/guest", json={"name": name}, name="/auth/guest", catch_response=True
            ) as response:
                if response.status_code == 429 and time.monotonic() < deadline:
                    response.request_meta["name"] = "/auth/guest (429, retried)"
                    response.success()
                    retry_after = response.headers.get("Retry-After", "1")
                    wait = float(retry_after) if retry_after.isdigit() else 1.0
                    gevent.sleep(min(max(wait, 0.2), 5.0) * (0.5 + random.random()))
                    continue
                if response.status_code != 200:
                    response.failure(f"guest token: {response.status_code} {response.text[:200]}")
                    return None
                token: str = response.json()["access_token"]
                return token

    if not shared:
        return fetch()
    with _shared_lock:
        host = user.host or ""
        if host not in _shared_tokens:
            token = fetch()
            if token is None:
                return None
            _shared_tokens[host] = token
        return _shared_tokens[host]


# --- users -------------------------------------------------------------------------------------


class _WebSocketUser(HttpUser):
    """A user holding one WebSocket session, opened again (after a pause) when it dies."""

    abstract = True
    session: Session | None = None

    def _open(self) -> bool:
        raise NotImplementedError

    def _session(self) -> Session | None:
        """The live session, or None after starting to open a new one for the next task."""
        session = self.session
        if session is not None and session.alive:
            return session
        if session is not None:
            session.close()
        self.session = None
        if not self._open():
            gevent.sleep(1.0)  # back off before trying again
        return None

    def on_stop(self) -> None:
        if self.session is not None:
            self.session.close()
            self.session = None


class ChatUser(_WebSocketUser):
    """Joins rooms on /ws/chat and publishes; records connect, join, ack and delivery times."""

    weight = 3

    def on_start(self) -> None:
        self.settings = Settings.of(self.environment)
        self.rng = random.Random()
        self.rooms = self.settings.pick_rooms(self.rng)
        self.offsets: dict[str, tuple[str, int]] = {}
        self.session = None
        self.next_ping = 0.0
        self.padding = "x" * self.settings.body_bytes
        self._open()

    def _open(self) -> bool:
        token = guest_token(self, self.settings.shared_token)
        if token is None:
            return False
        session = Session(
            self.environment, ws_url(self.host or "", "/ws/chat"), token, self.on_event, "connect"
        )
        if not session.connect():
            return False
        self.session = session
        for room in self.rooms:
            session.request(
                {
                    "type": "join",
                    "room": room,
                    "presence_events": self.settings.presence_events,
                },
                "join",
                timeout=10,
                on_reply=self._joined,
            )
        return True

    def _joined(self, reply: dict[str, Any]) -> None:
        self.offsets[reply["room"]] = (reply["epoch"], reply["offset"])

    def wait_time(self) -> float:
        rate = self.settings.publish_rate
        if rate <= 0:
            return self.settings.ping_interval
        return self.rng.expovariate(rate)  # Poisson arrivals: users do not publish in lockstep

    @task
    def publish(self) -> None:
        session = self._session()
        if session is None:
            return
        session.expire(self.settings.ack_timeout)
        if self.settings.publish_rate <= 0 or time.monotonic() >= self.next_ping:
            self.next_ping = time.monotonic() + self.settings.ping_interval
            session.request({"type": "ping"}, "ping", timeout=self.settings.ack_timeout)
            if self.settings.publish_rate <= 0:
                return
        room = self.rng.choice(self.rooms)
        body = {MARK: 1, "sent": time.time(), "text": self.padding}
        session.send_command({"type": "publish", "room": room, "body": body}, "publish-ack")

    def on_event(self, frame: dict[str, Any], size: int) -> None:
        if frame.get("type") != "message":
            return
        room, epoch, offset = frame.get("room"), frame.get("epoch"), frame.get("offset")
        if isinstance(room, str) and isinstance(offset, int) and isinstance(epoch, str):
            self.offsets[room] = in_order(
                self.environment, "delivery order", room, self.offsets.get(room), epoch, offset
            )
        body = frame.get("body")
        if not isinstance(body, dict) or MARK not in body:
            return
        sample = self.settings.delivery_sample
        if sample < 1.0 and self.rng.random() >= sample:
            return
        latency = max(0.0, (time.time() - float(body["sent"])) * 1000)
        record(self.environment, "delivery", latency, length=size)


class DashboardUser(_WebSocketUser):
    """Watches feed `items` on /ws/live; records how long REST changes take to arrive."""

    weight = 1

    def on_start(self) -> None:
        self.settings = Settings.of(self.environment)
        self.rng = random.Random()
        self.session = None
        self.position: tuple[str, int] | None = None
        self._open()

    def _open(self) -> bool:
        token = guest_token(self, self.settings.shared_token)
        if token is None:
            return False
        session = Session(
            self.environment,
            ws_url(self.host or "", "/ws/live"),
            token,
            self.on_event,
            "live connect",
        )
        if not session.connect():
            return False
        self.session = session
        session.request(
            {"type": "subscribe", "feed": "items"},
            "subscribe",
            timeout=10,
            on_reply=self._subscribed,
        )
        return True

    def _subscribed(self, reply: dict[str, Any]) -> None:
        self.position = (reply["epoch"], reply["offset"])

    def wait_time(self) -> float:
        return self.settings.ping_interval

    @task
    def keep_watching(self) -> None:
        session = self._session()
        if session is None:
            return
        session.request({"type": "ping"}, "ping", timeout=self.settings.ack_timeout)

    def on_event(self, frame: dict[str, Any], size: int) -> None:
        if frame.get("type") != "update" or frame.get("feed") != "items":
            return
        epoch, offset = frame.get("epoch"), frame.get("offset")
        if isinstance(epoch, str) and isinstance(offset, int):
            self.position = in_order(
                self.environment, "update order", "items", self.position, epoch, offset
            )
        data = frame.get("data")
        if not isinstance(data, dict) or data.get("op") not in ("created", "updated"):
            return  # a deleted item still carries the time of its last change, not this one
        item = data.get("item")
        payload = item.get("data") if isinstance(item, dict) else None
        if isinstance(payload, dict) and MARK in payload:
            latency = max(0.0, (time.time() - float(payload["sent"])) * 1000)
            record(self.environment, "update", latency, length=size)


class RestUser(HttpUser):
    """Items CRUD through the REST API; every change shows up on the dashboards."""

    weight = 1

    def on_start(self) -> None:
        self.settings = Settings.of(self.environment)
        self.rng = random.Random()
        self.items: dict[int, int] = {}  # id -> version
        self.headers: dict[str, str] = {}
        self._authenticate()

    def _authenticate(self) -> bool:
        if not self.headers:
            token = guest_token(self, shared=False)  # items belong to their owner: one each
            if token is not None:
                self.headers = {"Authorization": f"Bearer {token}"}
        return bool(self.headers)

    def wait_time(self) -> float:
        return self.rng.uniform(0.5, 1.5)

    def _data(self) -> dict[str, Any]:
        return {MARK: 1, "sent": time.time(), "n": self.rng.randrange(1_000_000)}

    @task(3)
    def create(self) -> None:
        if not self._authenticate():
            return
        if len(self.items) >= self.settings.items_per_user:
            self.delete()
            return
        with self.client.post(
            "/items",
            json={"title": f"load test {self.rng.randrange(10**6)}", "data": self._data()},
            headers=self.headers,
            name="/items",
            catch_response=True,
        ) as response:
            if response.status_code != 201:
                response.failure(f"{response.status_code} {response.text[:200]}")
                return
            item = response.json()
            self.items[item["id"]] = item["version"]

    @task(3)
    def read(self) -> None:
        if not self._authenticate():
            return
        if not self.items:
            return
        item_id = self.rng.choice(list(self.items))
        self.client.get(f"/items/{item_id}", headers=self.headers, name="/items/[id]")

    @task(2)
    def list_items(self) -> None:
        if not self._authenticate():
            return
        self.client.get("/items?limit=20", headers=self.headers, name="/items?limit=20")

    @task(2)
    def update(self) -> None:
        if not self._authenticate():
            return
        if not self.items:
            return
        item_id = self.rng.choice(list(self.items))
        with self.client.patch(
            f"/items/{item_id}",
            json={"version": self.items[item_id], "data": self._data()},
            headers=self.headers,
            name="/items/[id] PATCH",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code} {response.text[:200]}")
                return
            self.items[item_id] = response.json()["version"]

    @task(1)
    def delete(self) -> None:
        if not self._authenticate():
            return
        if not self.items:
            return
        item_id = next(iter(self.items))
        version = self.items.pop(item_id)
        with self.client.delete(
            f"/items/{item_id}?version={version}",
            headers=self.headers,
            name="/items/[id] DELETE",
            catch_response=True,
        ) as response:
            if response.status_code != 204:
                response.failure(f"{response.status_code} {response.text[:200]}")

    def on_stop(self) -> None:
        # Leave the deployment as it was: what this user created, it deletes.
        for item_id, version in list(self.items.items()):
            self.client.delete(
                f"/items/{item_id}?version={version}",
                headers=self.headers,
                name="/items/[id] DELETE",
            )
        self.items.clear()
