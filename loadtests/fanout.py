"""The fan-out benchmark: one room, N subscribers, one publisher, Collab against its peers.

What Locust cannot do at these rates: thousands of subscribers read every delivery in one
asyncio process (`loadtests.rawws`: no task or future per frame), and one publisher sends

1. *burst*: as fast as acks come back, with at most `--window` publishes unacknowledged (and at
   most `--max-inflight` deliveries not yet read by the subscribers, so that no server is made
   to buffer without bound and the figure is a steady state, not a backlog being written into
   socket buffers), for `--burst-seconds`: deliveries per second;
2. *rate*: `--rate` messages a second for `--rate-seconds`: publish-to-delivery latency
   (p50, p99), timed by a monotonic clock carried in the message body.

After each phase it waits until every message has reached every subscriber (or
`--drain-timeout` passes): `lost` counts deliveries that never came, `gaps` messages that came
out of order. Before the workload it measures the server's memory per idle joined connection:
the RSS of the server process (psutil, by PID) before and after the N connections joined.

Every server runs as its own process, started here, on a free loopback port, and stopped by
its PID: Collab exactly as operators start it (`python -m collab serve`: SQLite, memory broker,
presence, offsets, bounded queues, acks after storage), with the per-connection rate limit and
the connections-per-user cap raised so that every subscriber may share one guest token and the
publisher is not throttled; the subscribers join with `presence_events: false`.

Peers (`loadtests/peers/`): `websockets` (plain `broadcast()`, the reference), `fastapi` (the
naive endpoint), `socketio` (python-socketio on uvicorn) and `socketio-node` (node's socket.io,
installed with npm into its folder when node is available). Cases are interleaved (run 1 of
every target and size, then run 2, ...), so a noisy neighbour spreads over all of them.

    python -m loadtests.fanout compare --subscribers 250,500,1000,2000 --runs 3
    python -m loadtests.fanout compare --targets collab,collab-redis --subscribers 1,1000 \\
        --broker-url redis+cluster://127.0.0.1:7100
    python -m loadtests.fanout connections --count 10000 --targets collab,websockets
    python -m loadtests.fanout plot loadtests/results/fanout-*.json --out docs/fanout.png

With `--guests`, Collab's subscribers come in as a crowd of browsers would: each signs in over
REST as a guest of its own (a user row each), connects with that token and joins with the
default presence settings (presence events on), and `--burst-seconds 0` starts the rate phase
right after they came in (what a crowd leaves behind: collections, presence, lazy state). The
peers have no sign-in and get the same number of subscribers. `report` prints every run's p99
and maximum latency side by side: a tail must be good in every run, not in the median.

With `--stamp`, the subscribers read through `loadtests.rawws.StampedTransport`, and the rate
phase reports a second latency beside the one read in `data_received`: to the time the kernel
received the delivery (`SO_TIMESTAMPNS`), which is the server's own latency. Thousands of
subscribers on one core are read one socket after another, at about the pace a server writes
them, so the first figure also measures the generator: a server that writes a message's
deliveries faster than the generator reads them gains little in it.

Collab on a shared broker: `collab-redis` and `collab-redis-2` are Collab as a hub node on the
broker of `--broker-url` (`redis://` or `redis+cluster://`; a database or cluster the tool
EMPTIES before each of their cases) with one process and with two (`collab serve --workers 2`;
the kernel spreads the subscribers over them, and each case records how many each worker got).
Server CPU is that of every server process (master and workers), per million deliveries and as
messages per CPU-second; the broker's work is read from its masters' INFO before and after each
phase (commands, bytes in and out, CPU per published message, and its CPU per million
deliveries), which `loadtests/capacity.py --hub` reads. `--publishers N` publishes from N
connections in the burst (the cost of a busy room rather than the latency of one publisher).
`--collab-env` sets more of Collab's settings for every Collab target (say,
`COLLAB_CELERY_BROKER_URL=...`, so that the hub hands its messages to Celery as in production
rather than writing SQLite itself). `collab-gc-unfrozen` is Collab with `COLLAB_GC_FREEZE=false`.

    python -m loadtests.fanout compare --targets collab,collab-gc-unfrozen,websockets \
      --subscribers 2000 --runs 3 --guests --burst-seconds 0
    python -m loadtests.fanout compare --targets collab,collab-redis,collab-redis-2,websockets \
      --subscribers 2000 --runs 3 --broker-url redis://127.0.0.1:6379/9

The generator measures its own CPU and warns above 90% of a core: then it, not the server, may
be what limits the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import itertools
import json
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil  # type: ignore[import-untyped]

from loadtests.rawws import WebSocketClient, connect

REPO = Path(__file__).resolve().parent.parent
NODE_PEER = REPO / "loadtests" / "peers" / "socketio_node"
NODE_SUBSCRIBERS = REPO / "loadtests" / "node_subscribers"  # --node-subscribers
RESULTS = REPO / "loadtests" / "results"
GC_LOGGER = REPO / "loadtests" / "gclog"  # a sitecustomize that logs collections (--gc-log)
ROOM = "bench"
GENERATOR_CPU_WARNING = 90.0

# --- targets -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A server under test: how to start it and which dialect its clients speak."""

    name: str
    label: str
    dialect: str  # "collab": Collab's protocol (or the subset the simple peers speak); "socketio"
    path: str
    command: Callable[[int], list[str]]
    needs_token: bool = False
    # Collab on the broker of `--broker-url`: shared, so several processes are one node.
    on_redis: bool = False
    processes: int = 1
    settings: tuple[tuple[str, str], ...] = ()  # COLLAB_* settings (its own, `--collab-env`)

    def available(self) -> str | None:
        """Why this target cannot run here, or None."""
        if self.on_redis and not BROKER_URL:
            return (
                "needs a broker of its own: --broker-url redis://127.0.0.1:PORT/N"
                " (or redis+cluster://HOST:PORT)"
            )
        if self.name == "socketio":
            try:
                import socketio  # type: ignore[import-untyped]  # noqa: F401
            except ImportError:
                return "python-socketio is not installed (pip install python-socketio)"
        if self.name == "socketio-node":
            return node_packages_missing(NODE_PEER, "socket.io")
        return None


def _python(module: str, *extra: str) -> Callable[[int], list[str]]:
    return lambda port: [sys.executable, "-m", module, "--port", str(port), *extra]


def _collab(workers: int = 1) -> Callable[[int], list[str]]:
    def command(port: int) -> list[str]:
        line = [sys.executable, "-m", "collab", "serve", "--port", str(port)]
        if workers > 1:
            line += ["--workers", str(workers)]
        return [*line, "--log-level", "warning"]

    return command


# The broker the Redis targets use (`--broker-url`: redis:// or redis+cluster://); emptied
# before each of their cases.
BROKER_URL: str | None = None

# `--pin SERVER:GENERATOR`: the CPUs the server under test (with every process it starts) and
# this generator run on, or None to leave both to the scheduler. The issue that asked for the
# connect and tail figures measured that way (a server on one core, its clients on the other):
# neither side then takes the other's core in a burst, and a run says more about the server
# than about where the scheduler happened to put the two.
PIN: tuple[set[int], set[int]] | None = None


def parse_pin(spec: str) -> tuple[set[int], set[int]]:
    """`0:1` or `0:1-3`: the server's CPUs and the generator's, disjoint, all on this machine."""

    def cpus(part: str) -> set[int]:
        chosen: set[int] = set()
        for item in part.split(","):
            low, _, high = item.partition("-")
            chosen.update(range(int(low), int(high or low) + 1))
        return chosen

    try:
        server_part, generator_part = spec.split(":")
        server, generator = cpus(server_part), cpus(generator_part)
    except ValueError:
        raise SystemExit(f"--pin takes SERVER:GENERATOR CPUs, such as 0:1; not {spec!r}") from None
    available = os.sched_getaffinity(0)
    if not server or not generator or server & generator or not (server | generator) <= available:
        raise SystemExit(
            f"--pin {spec}: two disjoint, non-empty sets of CPUs from {sorted(available)}"
        )
    return server, generator


TARGETS: dict[str, Target] = {
    target.name: target
    for target in (
        Target("collab", "Collab", "collab", "/ws/chat", _collab(), needs_token=True),
        Target(
            # The same without the collector's tuning (collab/gc_pauses.py): the before/after.
            "collab-gc-unfrozen",
            "Collab, GC not frozen",
            "collab",
            "/ws/chat",
            _collab(),
            needs_token=True,
            settings=(("COLLAB_GC_FREEZE", "false"),),
        ),
        Target(
            "collab-redis",
            "Collab on Redis, 1 process",
            "collab",
            "/ws/chat",
            _collab(),
            needs_token=True,
            on_redis=True,
        ),
        Target(
            "collab-redis-2",
            "Collab on Redis, 2 processes",
            "collab",
            "/ws/chat",
            _collab(workers=2),
            needs_token=True,
            on_redis=True,
            processes=2,
        ),
        Target(
            "websockets",
            "websockets broadcast()",
            "collab",
            "/",
            _python("loadtests.peers.websockets_server"),
        ),
        Target(
            "fastapi", "naive FastAPI", "collab", "/ws", _python("loadtests.peers.fastapi_server")
        ),
        Target(
            "socketio",
            "python-socketio",
            "socketio",
            "/socket.io/?EIO=4&transport=websocket",
            _python("loadtests.peers.socketio_server"),
        ),
        Target(
            "socketio-node",
            "socket.io (node)",
            "socketio",
            "/socket.io/?EIO=4&transport=websocket",
            lambda port: ["node", str(NODE_PEER / "server.js"), "--port", str(port)],
        ),
    )
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """One server process on a free loopback port; stopped by its PID."""

    def __init__(
        self, target: Target, workdir: Path, max_connections: int, gc_log: Path | None = None
    ) -> None:
        self.target = target
        self.gc_log = gc_log
        self.port = free_port()
        self.workdir = workdir
        self.max_connections = max_connections
        self.process: subprocess.Popen[bytes] | None = None
        self.ps: psutil.Process | None = None
        self.token: str | None = None
        self.log_path = workdir / f"{target.name}-{self.port}.log"

    @property
    def base(self) -> str:
        return f"127.0.0.1:{self.port}"

    def environment(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        if self.gc_log is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(GC_LOGGER), env["PYTHONPATH"]])
            env["FANOUT_GC_LOG"] = str(self.gc_log)
        if self.target.needs_token:  # Collab, on whichever broker
            if self.target.on_redis:
                assert BROKER_URL is not None
                env["COLLAB_BROKER_URL"] = BROKER_URL
            env.update(
                {
                    "COLLAB_DATABASE_URL": f"sqlite+aiosqlite:///{self.workdir / 'collab.db'}",
                    "COLLAB_SECRET_KEY": "bench-" + "k" * 48,
                    # Raised for load; everything else (presence, offsets, bounded queues,
                    # acks after storage, heartbeats) stays at its default.
                    "COLLAB_RATE_LIMIT": "1000000",
                    "COLLAB_RATE_BURST": "1000000",
                    "COLLAB_MAX_CONNECTIONS_PER_USER": str(self.max_connections),
                    "COLLAB_MAX_CONNECTIONS": str(self.max_connections),
                    # A crowd of guest sign-ins (`--guests`) all come from 127.0.0.1.
                    "COLLAB_AUTH_RATE_LIMIT": "1000000",
                    "COLLAB_AUTH_RATE_BURST": "1000000",
                    **dict(self.target.settings),
                }
            )
        return env

    def launch(self) -> subprocess.Popen[bytes]:
        # A child inherits the affinity of the thread that starts it: this thread moves to the
        # server's CPUs for the spawn, so every thread and worker the server ever starts (Node's
        # among them, which start threads at once) is on them from its first instruction.
        if PIN is not None:
            os.sched_setaffinity(0, PIN[0])
        try:
            with self.log_path.open("ab") as log:
                self.process = subprocess.Popen(
                    self.target.command(self.port),
                    cwd=REPO,
                    env=self.environment(),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        finally:
            if PIN is not None:
                os.sched_setaffinity(0, PIN[1])
        self.ps = psutil.Process(self.process.pid)
        return self.process

    async def start(self, within: float = 60.0) -> None:
        if self.target.on_redis:
            await asyncio.to_thread(redis_flush)
        process = self.launch()
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"{self.target.name} exited early:\n{self.log_tail()}")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.1)
        else:
            self.stop()
            raise RuntimeError(f"{self.target.name} did not listen in {within}s")
        if self.target.processes > 1:
            await self._all_workers(deadline)
        if self.target.needs_token:
            self.token = await asyncio.to_thread(self._guest_token)
        # The PID is for attaching a profiler: py-spy record -p PID
        print(f"  server pid {process.pid}, port {self.port}", flush=True)

    async def _all_workers(self, deadline: float) -> None:
        """Until every worker has started: the master listens before they have, and a
        connection made meanwhile would wait for whichever worker is up first. A worker's
        lifespan connects to the broker before it serves, so a worker holding a connection
        to the broker is (all but) up; /readyz then answers from a started one."""
        ports = await asyncio.to_thread(_broker_ports)
        while True:
            workers = self.processes()[1:]
            up = [w for w in workers if _connected_to(w, ports)]
            if len(up) >= self.target.processes:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.target.name}: workers did not start\n{self.log_tail()}")
            await asyncio.sleep(0.2)
        while True:
            try:
                await asyncio.to_thread(self._get, "/readyz")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)

    def _get(self, path: str) -> bytes:
        with urllib.request.urlopen(f"http://{self.base}{path}", timeout=10) as response:
            body: bytes = response.read()
        return body

    def processes(self) -> list[psutil.Process]:
        """The server's process and every process it started (uvicorn's workers)."""
        assert self.ps is not None
        try:
            return [self.ps, *self.ps.children(recursive=True)]
        except psutil.NoSuchProcess:
            return [self.ps]

    def connections_by_process(self) -> list[int]:
        """Established client connections to the server's port in each process that serves
        it (uvicorn's workers; not its master, nor helpers that do not listen): where the
        kernel put the subscribers."""
        counts = []
        processes = self.processes()
        for process in processes[1:] or processes:
            try:
                sockets = process.net_connections(kind="tcp")
            except psutil.Error:
                continue
            mine = [c for c in sockets if c.laddr and c.laddr.port == self.port]
            if any(c.status == psutil.CONN_LISTEN for c in mine):
                counts.append(sum(1 for c in mine if c.status == psutil.CONN_ESTABLISHED))
        return counts

    def _guest_token(self) -> str:
        request = urllib.request.Request(
            f"http://{self.base}/auth/guest",
            data=b'{"name": "bench"}',
            headers={"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            token: str = json.loads(response.read())["access_token"]
        return token

    def url(self) -> str:
        path = self.target.path
        if self.token:
            path += ("&" if "?" in path else "?") + f"token={self.token}"
        return f"ws://{self.base}{path}"

    def rss(self) -> int:
        """Of every process of the server (one, or uvicorn's master and its workers)."""
        return sum(_quietly(lambda p: p.memory_info().rss, p, 0) for p in self.processes())

    def cpu_seconds(self) -> float:
        """Of every process of the server: the master and each worker."""
        return float(sum(_quietly(_cpu_of, p, 0.0) for p in self.processes()))

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, then SIGKILL when it does not go in time; only our own process."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)

    def collections(self, since: float, until: float) -> list[tuple[float, int, float, int]]:
        """The collections its processes logged (`--gc-log`) between two monotonic times:
        (time, generation, milliseconds, objects in generation 2)."""
        if self.gc_log is None:
            return []
        found = []
        for process in self.processes():
            path = self.gc_log / f"gc-{process.pid}.log"
            with contextlib.suppress(OSError):
                for line in path.read_text().splitlines():
                    at, generation, took, size = line.split()
                    ended = float(at)
                    if since <= ended - float(took) / 1000 and ended <= until:
                        found.append((ended, int(generation), float(took), int(size)))
        return sorted(found)

    def log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""


def _cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _quietly(read: Callable[[psutil.Process], Any], process: psutil.Process, default: Any) -> Any:
    """A figure of a process that may have gone meanwhile (then `default`)."""
    try:
        return read(process)
    except psutil.Error:
        return default


def _connected_to(process: psutil.Process, ports: set[int]) -> bool:
    try:
        sockets = process.net_connections(kind="tcp")
    except psutil.Error:
        return False
    return any(c.raddr and c.raddr.port in ports for c in sockets)


def _broker_masters() -> list[Any]:
    """Clients of the masters of `--broker-url` (one Redis, or every master of a cluster)."""
    from loadtests.bench_redis_shard import masters

    assert BROKER_URL is not None
    return masters(BROKER_URL)


def _broker_ports() -> set[int]:
    shards = _broker_masters()
    try:
        return {int(shard.connection_pool.connection_kwargs["port"]) for shard in shards}
    finally:
        for shard in shards:
            shard.close()


def redis_flush() -> None:
    """Empty the broker of `--broker-url` (its database, or every master of a cluster), so
    that every case starts with a new room."""
    shards = _broker_masters()
    try:
        for shard in shards:
            shard.flushdb()
    finally:
        for shard in shards:
            shard.close()


def _redis_snapshot() -> dict[str, float]:
    """What the broker's masters have done so far (INFO: commands, bytes, CPU)."""
    from loadtests.bench_redis_shard import snapshot

    shards = _broker_masters()
    try:
        return snapshot(shards)
    finally:
        for shard in shards:
            shard.close()


async def _redis_work(server: Server) -> dict[str, float] | None:
    """The broker's INFO totals for a target on the broker, or None."""
    if not server.target.on_redis:
        return None
    return await asyncio.to_thread(_redis_snapshot)


# --- clients -----------------------------------------------------------------------------------


class Recorder:
    """Counts every delivery to the subscribers; the latencies while a phase records them."""

    __slots__ = (
        "arrivals",
        "complete",
        "counts",
        "deliveries",
        "gaps",
        "last_delivery",
        "latencies",
        "members",
        "progress",
        "slowest",
        "waiting",
    )

    def __init__(self) -> None:
        self.members = 0
        self.deliveries = 0
        self.complete = 0  # messages that reached every subscriber
        self.counts: dict[tuple[int, int], int] = {}  # (publisher, seq) -> deliveries
        self.gaps = 0
        self.last_delivery = 0.0
        self.latencies: list[float] | None = None
        self.arrivals: list[float] | None = None  # the same to the kernel's receive time
        self.slowest = (0.0, 0.0)  # the longest latency while recording, and when it was sent
        self.progress = asyncio.Event()
        self.waiting = False

    def delivered(
        self, session: Session, source: int, seq: int, sent: float, arrived: float
    ) -> None:
        now = time.monotonic()
        self.deliveries += 1
        self.last_delivery = now
        if self.latencies is not None:
            latency = now - sent
            self.latencies.append(latency)
            if latency > self.slowest[0]:
                self.slowest = (latency, sent)
            if arrived and self.arrivals is not None:
                self.arrivals.append(arrived - sent)
        # In order per publisher (several publishers' messages interleave in any order).
        if seq != session.seen.get(source, 0) + 1:
            self.gaps += 1
        session.seen[source] = seq
        key = (source, seq)
        count = self.counts.get(key, 0) + 1
        if count >= self.members:
            self.counts.pop(key, None)
            self.complete += 1
            if self.waiting:
                self.progress.set()
        else:
            self.counts[key] = count

    def wake(self) -> None:
        if self.waiting:
            self.progress.set()

    async def until(self, condition: Callable[[], bool], within: float) -> bool:
        """Wait (woken by deliveries and acks) until `condition()` holds; False on timeout."""
        deadline = time.monotonic() + within
        while not condition():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self.progress.clear()
            self.waiting = True
            try:
                await asyncio.wait_for(self.progress.wait(), min(remaining, 0.5))
            except TimeoutError:
                pass
            finally:
                self.waiting = False
        return True


_COLLAB_MESSAGE = b'{"type":"message"'
_SIO_MESSAGE = b'42["message"'


class Session:
    """One connection: joins the room, then counts deliveries (subscriber) or acks (publisher)."""

    __slots__ = (
        "ack_latencies",
        "acked",
        "dialect",
        "error",
        "index",
        "last_seq",
        "presence_events",
        "publisher",
        "ready",
        "recorder",
        "seen",
        "sent_at",
        "ws",
    )

    def __init__(
        self,
        dialect: str,
        recorder: Recorder,
        *,
        publisher: bool = False,
        index: int = 0,
        presence_events: bool | None = False,
    ) -> None:
        self.dialect = dialect
        # None: the join leaves it out, and gets the default (events on), as a browser does.
        self.presence_events = presence_events
        self.recorder = recorder
        self.publisher = publisher
        self.index = index  # a publisher's number, in the body of what it publishes
        self.seen: dict[int, int] = {}  # a subscriber's last seq per publisher
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.last_seq = 0
        self.ws: WebSocketClient | None = None
        self.error: str | None = None
        self.acked = 0
        self.sent_at: dict[int, float] = {}
        self.ack_latencies: list[float] | None = None

    # The hot path: every delivery of the run comes through here.
    def on_text(self, ws: WebSocketClient, payload: bytes) -> None:
        if self.dialect == "collab":
            if payload.startswith(_COLLAB_MESSAGE):
                if not self.publisher:
                    body = orjson.loads(payload)["body"]
                    self.recorder.delivered(self, body["p"], body["seq"], body["t"], ws.arrived)
                return
            self._collab_control(ws, orjson.loads(payload))
            return
        if payload.startswith(_SIO_MESSAGE):
            if not self.publisher:
                body = orjson.loads(payload[2:])[1]["body"]
                self.recorder.delivered(self, body["p"], body["seq"], body["t"], ws.arrived)
            return
        self._socketio_control(ws, payload)

    def _collab_control(self, ws: WebSocketClient, frame: dict[str, Any]) -> None:
        kind = frame.get("type")
        if kind == "welcome":
            join: dict[str, Any] = {"type": "join", "id": 0, "room": ROOM}
            if self.presence_events is not None:
                join["presence_events"] = self.presence_events
            ws.send(orjson.dumps(join))
        elif kind == "joined":
            if not self.ready.done():
                self.ready.set_result(None)
        elif kind == "ack":
            self._acked(int(frame["id"]))
        elif kind == "error":
            self._fail(f"error {frame.get('code')}: {frame.get('message')}")

    def _socketio_control(self, ws: WebSocketClient, payload: bytes) -> None:
        if payload == b"2":  # engine.io ping
            ws.send(b"3")
        elif payload.startswith(b"0"):  # engine.io open: connect to the default namespace
            ws.send(b"40")
        elif payload.startswith(b"40"):  # namespace connected: join the room (ack id 0)
            ws.send(b'420["join",' + orjson.dumps(ROOM) + b"]")
        elif payload.startswith(b"43"):  # an ack
            ack_id = int(payload[2 : payload.index(b"[")])
            if ack_id == 0:
                if not self.ready.done():
                    self.ready.set_result(None)
            else:
                self._acked(ack_id)
        elif payload.startswith(b"44"):
            self._fail(f"connect error: {payload[:200]!r}")

    def _acked(self, seq: int) -> None:
        self.acked += 1
        sent = self.sent_at.pop(seq, None)
        if sent is not None and self.ack_latencies is not None:
            self.ack_latencies.append(time.monotonic() - sent)
        self.recorder.wake()

    def _fail(self, reason: str) -> None:
        self.error = reason
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(reason))

    def publish(self, seq: int) -> None:
        assert self.ws is not None
        now = time.monotonic()
        self.sent_at[seq] = now
        body = {"seq": seq, "p": self.index, "t": now, "text": "hello"}
        if self.dialect == "collab":
            frame = orjson.dumps({"type": "publish", "id": seq, "room": ROOM, "body": body})
        else:
            data = orjson.dumps(["publish", {"room": ROOM, "body": body}])
            frame = b"42" + str(seq).encode() + data
        self.ws.send(frame)


async def open_session(
    url: str,
    dialect: str,
    recorder: Recorder,
    *,
    publisher: bool = False,
    index: int = 0,
    presence_events: bool | None = False,
    within: float = 30.0,
    stamped: bool = False,
) -> Session:
    session = Session(
        dialect, recorder, publisher=publisher, index=index, presence_events=presence_events
    )
    session.ws = await connect(url, session.on_text, within=within, stamped=stamped)
    try:
        await asyncio.wait_for(asyncio.shield(session.ready), within)
    except BaseException:
        session.ws.abort()
        if session.ready.done() and not session.ready.cancelled():
            session.ready.exception()
        raise
    return session


class GuestDoor:
    """Subscribers that arrive as a browser does: each signs in as a guest of its own over
    REST (`POST /auth/guest`: a user row each), then connects with that token and joins with
    the default presence settings (the events on), so the room has N distinct users."""

    def __init__(
        self, server: Server, recorder: Recorder, concurrency: int, stamped: bool = False
    ) -> None:
        import httpx

        self.server = server
        self.stamped = stamped
        self.recorder = recorder
        # A connection per sign-in: each guest is a browser of its own (and no request races
        # the server's keep-alive timeout on a connection it is closing).
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=0)
        self.client = httpx.AsyncClient(base_url=f"http://{server.base}", limits=limits, timeout=30)
        self.names = itertools.count(1)

    async def open(self) -> Session:
        response = await self.client.post("/auth/guest", json={"name": f"guest {next(self.names)}"})
        response.raise_for_status()
        token = response.json()["access_token"]
        url = f"ws://{self.server.base}{self.server.target.path}?token={token}"
        return await open_session(
            url,
            self.server.target.dialect,
            self.recorder,
            presence_events=None,
            stamped=self.stamped,
        )

    async def close(self) -> None:
        await self.client.aclose()


async def open_many(
    count: int, opener: Callable[[], Awaitable[Session]], concurrency: int
) -> tuple[list[Session], dict[str, int], float]:
    """Open `count` sessions, at most `concurrency` handshakes at once: the sessions, failures
    by reason, and the seconds it took."""
    gate = asyncio.Semaphore(concurrency)
    failures: dict[str, int] = {}
    sessions: list[Session] = []

    async def one() -> None:
        async with gate:
            try:
                sessions.append(await opener())
            except Exception as exc:  # every failure is counted and reported, none is fatal
                reason = f"{type(exc).__name__}: {exc}"[:120]
                failures[reason] = failures.get(reason, 0) + 1

    started = time.monotonic()
    await asyncio.gather(*(one() for _ in range(count)))
    return sessions, failures, time.monotonic() - started


class CpuMeter:
    """CPU over a phase, in percent of one core: the server's, this generator's, and that of
    every other process on the machine (on a shared machine, a server below 100% may be
    starved rather than idle)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.me = psutil.Process()
        self.wall = time.monotonic()
        self.server_cpu = server.cpu_seconds()
        times = self.me.cpu_times()
        self.gen_cpu = times.user + times.system
        self.machine = _busy_seconds()
        self.server_seconds = 0.0

    def read(self) -> tuple[float, float, float]:
        wall = max(time.monotonic() - self.wall, 1e-9)
        times = self.me.cpu_times()
        self.server_seconds = self.server.cpu_seconds() - self.server_cpu
        server = self.server_seconds / wall * 100
        generator = (times.user + times.system - self.gen_cpu) / wall * 100
        machine = (_busy_seconds() - self.machine) / wall * 100
        others = max(0.0, machine - server - generator)
        return round(server, 1), round(generator, 1), round(others, 1)


def _busy_seconds() -> float:
    """CPU seconds the whole machine spent busy (all cores)."""
    times = psutil.cpu_times()
    idle = times.idle + getattr(times, "iowait", 0.0)
    return float(sum(times) - idle)


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


# --- one case ----------------------------------------------------------------------------------


@dataclass
class Options:
    window: int = 256
    max_inflight: int = 131072
    burst_seconds: float = 5.0
    rate: float = 10.0
    rate_seconds: float = 10.0
    drain_timeout: float = 15.0
    concurrency: int = 200
    settle: float = 2.0
    publishers: int = 1
    guests: bool = False
    gc_log: Path | None = None
    stamp: bool = False
    node_subscribers: bool = False


@dataclass
class Phase:
    published: int = 0
    acked: int = 0
    deliveries: int = 0
    expected: int = 0
    lost: int = 0
    gaps: int = 0
    seconds: float = 0.0
    deliveries_per_s: float = 0.0
    messages_per_s: float = 0.0
    throttled_by_inflight: int = 0
    p50_ms: float | None = None
    p99_ms: float | None = None
    p999_ms: float | None = None
    max_ms: float | None = None
    # With --stamp: the same to the time the kernel received each delivery (the server's part).
    arrival_p50_ms: float | None = None
    arrival_p99_ms: float | None = None
    arrival_max_ms: float | None = None
    # When the message of the longest latency was sent, in seconds from the phase's start
    # (and on the machine's monotonic clock, to line it up with a server's own logs).
    max_sent_after_s: float | None = None
    max_sent_monotonic: float | None = None
    # With --gc-log: the server's full (generation 2) collections during the phase, the
    # longest of them, the most objects one walked, and the longest pause of any generation.
    gc_full_passes: int | None = None
    gc_full_longest_ms: float | None = None
    gc_full_most_objects: int | None = None
    gc_longest_ms: float | None = None
    ack_p50_ms: float | None = None
    ack_p99_ms: float | None = None
    server_cpu: float = 0.0
    generator_cpu: float = 0.0
    others_cpu: float = 0.0  # every other process on the machine, in % of one core
    # Deliveries per second of server CPU: less at the mercy of a noisy neighbour.
    deliveries_per_server_cpu_s: int = 0
    # Published messages per second of server CPU (each also costs its deliveries).
    messages_per_server_cpu_s: int = 0
    # Seconds of CPU of every server process per million deliveries: the figure that still
    # means something when the generator is the limit. The broker's own, apart.
    server_cpu_s_per_million: float | None = None
    redis_cpu: float | None = None  # % of one core, the broker's masters together
    redis_cpu_s_per_million: float | None = None
    disconnected: int = 0
    # Frames other than messages the subscribers read during the phase, by type, and the
    # subscribers' own CPU in % of one core (Node subscribers; the rest of `others_cpu` is
    # the kernel's softirq work and other processes): work a reader does for one server and
    # not for another.
    other_frames: dict[str, int] | None = None
    reader_cpu: float | None = None
    # On the broker's masters (INFO), per published message (targets on the broker).
    redis: dict[str, float] | None = None


@dataclass
class Case:
    target: str
    subscribers: int
    run: int
    joined: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    connect_seconds: float = 0.0
    rss_before: int = 0
    rss_after: int = 0
    bytes_per_connection: float = 0.0
    connections_per_s: float = 0.0
    # Subscribers per serving process (uvicorn's workers, when there are several).
    connections_by_process: list[int] = field(default_factory=list)
    guests: bool = False  # each subscriber signed in as a guest of its own
    burst: Phase | None = None
    rate: Phase | None = None
    error: str | None = None


def _collections(phase: Phase, server: Server, started: float) -> None:
    if server.gc_log is None:
        return
    passes = server.collections(started, time.monotonic())
    full = [p for p in passes if p[1] == 2]
    phase.gc_full_passes = len(full)
    phase.gc_full_longest_ms = max((p[2] for p in full), default=0.0)
    phase.gc_full_most_objects = max((p[3] for p in full), default=0)
    phase.gc_longest_ms = max((p[2] for p in passes), default=0.0)


def _cpu_per_delivery(
    phase: Phase,
    meter: CpuMeter,
    redis_before: dict[str, float] | None,
    redis_after: dict[str, float] | None,
) -> None:
    """The server's CPU per delivery and per message, and, on a broker, the work of its
    masters (INFO) per published message and per delivery (its CPU leaves `others`)."""
    seconds = max(meter.server_seconds, 1e-9)
    phase.deliveries_per_server_cpu_s = round(phase.deliveries / seconds)
    phase.messages_per_server_cpu_s = round(phase.published / seconds)
    if phase.deliveries:
        phase.server_cpu_s_per_million = round(meter.server_seconds / phase.deliveries * 1e6, 2)
    if redis_before is None or redis_after is None:
        return
    work = {key: redis_after[key] - redis_before[key] for key in redis_after}
    wall = max(time.monotonic() - meter.wall, 1e-9)
    phase.redis_cpu = round(work["cpu"] / wall * 100, 1)
    phase.others_cpu = round(max(0.0, phase.others_cpu - phase.redis_cpu), 1)
    if phase.deliveries:
        phase.redis_cpu_s_per_million = round(work["cpu"] / phase.deliveries * 1e6, 2)
    if phase.published:
        per = {key: value / phase.published for key, value in work.items()}
        per["cpu_us"] = per.pop("cpu") * 1e6
        phase.redis = {f"{key}_per_message": round(value, 2) for key, value in per.items()}


async def _burst(
    server: Server,
    publishers: list[Session],
    recorder: Recorder,
    subs: list[Session],
    opts: Options,
) -> Phase:
    """As fast as acks come back, from every publisher in turn, `opts.window` unacknowledged
    publishes in all."""
    phase = Phase()
    redis_before = await _redis_work(server)
    meter = CpuMeter(server)
    sent = 0
    start_deliveries, start_gaps = recorder.deliveries, recorder.gaps
    start_complete = recorder.complete
    start_acked = sum(p.acked for p in publishers)
    started = time.monotonic()
    deadline = started + opts.burst_seconds
    # In messages: enough deliveries in flight to keep any server busy, few enough that every
    # one of them is a fraction of a second of work.
    max_lag = max(2, opts.max_inflight // max(len(subs), 1))

    def unacked() -> int:
        return sent - (sum(p.acked for p in publishers) - start_acked)

    def may_send() -> bool:
        behind = sent - (recorder.complete - start_complete)
        return unacked() < opts.window and behind < max_lag

    while time.monotonic() < deadline:
        if not may_send():
            if unacked() < opts.window:
                phase.throttled_by_inflight += 1
            if not await recorder.until(may_send, deadline - time.monotonic()):
                break
            continue
        publisher = publishers[sent % len(publishers)]
        publisher.last_seq += 1
        publisher.publish(publisher.last_seq)
        sent += 1
        if sent % 16 == 0:
            await asyncio.sleep(0)  # let replies in between publishes
    phase.published = sent
    await recorder.until(
        lambda: recorder.complete - start_complete >= phase.published, opts.drain_timeout
    )
    await recorder.until(lambda: unacked() <= 0, 5.0)
    phase.server_cpu, phase.generator_cpu, phase.others_cpu = meter.read()
    phase.acked = sum(p.acked for p in publishers) - start_acked
    phase.deliveries = recorder.deliveries - start_deliveries
    phase.expected = phase.published * len(subs)
    phase.lost = phase.expected - phase.deliveries
    phase.gaps = recorder.gaps - start_gaps
    phase.seconds = round(max(recorder.last_delivery - started, 1e-9), 3)
    phase.deliveries_per_s = round(phase.deliveries / phase.seconds)
    phase.messages_per_s = round(phase.published / phase.seconds, 1)
    phase.disconnected = sum(1 for s in subs if s.ws is None or not s.ws.is_open)
    _cpu_per_delivery(phase, meter, redis_before, await _redis_work(server))
    return phase


async def _publish_at_rate(publisher: Session, count: int, interval: float, started: float) -> None:
    """`count` messages, the i-th at `started + i * interval` (not after the one before: a
    late send does not push the rest back)."""
    seq = publisher.last_seq
    for i in range(count):
        delay = started + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        seq += 1
        publisher.publish(seq)
    publisher.last_seq = seq


async def _rate(
    server: Server, publisher: Session, recorder: Recorder, subs: list[Session], opts: Options
) -> Phase:
    phase = Phase()
    count = max(1, round(opts.rate * opts.rate_seconds))
    interval = 1.0 / opts.rate
    recorder.latencies = []
    recorder.arrivals = [] if opts.stamp else None
    recorder.slowest = (0.0, 0.0)
    publisher.ack_latencies = []
    start_deliveries, start_gaps = recorder.deliveries, recorder.gaps
    start_acked, start_complete = publisher.acked, recorder.complete
    redis_before = await _redis_work(server)
    meter = CpuMeter(server)
    started = time.monotonic()
    await _publish_at_rate(publisher, count, interval, started)
    await recorder.until(lambda: recorder.complete - start_complete >= count, opts.drain_timeout)
    await recorder.until(lambda: publisher.acked - start_acked >= count, 5.0)
    phase.server_cpu, phase.generator_cpu, phase.others_cpu = meter.read()
    latencies, recorder.latencies = recorder.latencies, None
    arrivals, recorder.arrivals = recorder.arrivals, None
    acks, publisher.ack_latencies = publisher.ack_latencies, None
    phase.published = count
    phase.acked = publisher.acked - start_acked
    phase.deliveries = recorder.deliveries - start_deliveries
    phase.expected = count * len(subs)
    phase.lost = phase.expected - phase.deliveries
    phase.gaps = recorder.gaps - start_gaps
    phase.seconds = round(recorder.last_delivery - started, 3)
    phase.deliveries_per_s = round(phase.deliveries / max(phase.seconds, 1e-9))
    phase.messages_per_s = round(count / max(phase.seconds, 1e-9), 1)
    phase.p50_ms = ms(percentile(latencies, 50))
    phase.p99_ms = ms(percentile(latencies, 99))
    phase.p999_ms = ms(percentile(latencies, 99.9))
    _collections(phase, server, started)
    phase.max_ms = ms(max(latencies) if latencies else None)
    if arrivals:
        phase.arrival_p50_ms = ms(percentile(arrivals, 50))
        phase.arrival_p99_ms = ms(percentile(arrivals, 99))
        phase.arrival_max_ms = ms(max(arrivals))
    if latencies:
        phase.max_sent_after_s = round(recorder.slowest[1] - started, 3)
        phase.max_sent_monotonic = round(recorder.slowest[1], 3)
    phase.ack_p50_ms = ms(percentile(acks, 50))
    phase.ack_p99_ms = ms(percentile(acks, 99))
    phase.disconnected = sum(1 for s in subs if s.ws is None or not s.ws.is_open)
    _cpu_per_delivery(phase, meter, redis_before, await _redis_work(server))
    return phase


class NodeSubscribers:
    """The subscribers as one Node process of `ws` clients (`loadtests/node_subscribers`),
    on the generator's CPUs: what the outside harness of issue 10 measured with, and a reader
    that keeps up with a server this generator cannot (`--node-subscribers`)."""

    def __init__(self, process: asyncio.subprocess.Process, ready: int, failed: int) -> None:
        self.process = process
        self.ready = ready
        self.failed = failed

    @classmethod
    async def open(cls, server: Server, count: int, opts: Options) -> NodeSubscribers:
        guests = opts.guests and server.target.needs_token
        config = {
            "base": server.base,
            "path": server.target.path,
            "room": ROOM,
            "count": count,
            "concurrency": opts.concurrency,
            "guests": guests,
            "token": server._guest_token() if server.target.needs_token and not guests else None,
        }
        process = await asyncio.create_subprocess_exec(
            "node",
            "--expose-gc",
            str(NODE_SUBSCRIBERS / "subscribers.js"),
            json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=256 * 1024 * 1024,  # the latencies come back as one line
        )
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), 600)
        if not line:
            raise RuntimeError("the Node subscribers exited before they were in")
        ready = json.loads(line)
        return cls(process, int(ready["ready"]), int(ready["failed"]))

    async def tell(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        await self.process.stdin.drain()

    async def result(self, within: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), within)
        result: dict[str, Any] = json.loads(line)
        return result

    async def close(self) -> None:
        if self.process.returncode is None:
            self.process.kill()  # the process this generator started, by its handle
        await self.process.wait()


def node_packages_missing(folder: Path, package: str) -> str | None:
    """Why a Node program of the benchmark's cannot run here, or None. Installs its locked
    packages (`npm ci`, the versions its package-lock.json names) on first use."""
    if shutil.which("node") is None:
        return "node is not installed"
    if (folder / "node_modules" / package).is_dir():
        return None
    if shutil.which("npm") is None:
        return "npm is not installed"
    print(f"installing {package} with npm into {folder} ...", flush=True)
    done = subprocess.run(
        ["npm", "ci", "--no-audit", "--no-fund", "--prefix", str(folder)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return None if done.returncode == 0 else f"npm ci failed: {done.stderr[-500:]}"


def node_subscribers_missing() -> str | None:
    """Why `--node-subscribers` cannot run here, or None (installs `ws` on first use)."""
    return node_packages_missing(NODE_SUBSCRIBERS, "ws")


async def _node_rate(
    server: Server, publisher: Session, recorder: Recorder, nodes: NodeSubscribers, opts: Options
) -> Phase:
    """The rate phase (`_rate`) with the deliveries read by the Node subscribers."""
    phase = Phase()
    count = max(1, round(opts.rate * opts.rate_seconds))
    interval = 1.0 / opts.rate
    publisher.ack_latencies = []
    start_acked = publisher.acked
    meter = CpuMeter(server)
    reader = psutil.Process(nodes.process.pid)
    reader_before = sum(reader.cpu_times()[:2])
    await nodes.tell("record")
    started = time.monotonic()
    await _publish_at_rate(publisher, count, interval, started)
    await recorder.until(lambda: publisher.acked - start_acked >= count, opts.drain_timeout)
    reader_cpu = sum(reader.cpu_times()[:2]) - reader_before
    reader_wall = max(time.monotonic() - started, 1e-9)
    await nodes.tell(f"done {count} {opts.drain_timeout}")
    result = await nodes.result(opts.drain_timeout + 60)
    phase.server_cpu, phase.generator_cpu, phase.others_cpu = meter.read()
    phase.reader_cpu = round(reader_cpu / reader_wall * 100, 1)
    latencies: list[float] = result["latencies"]
    acks, publisher.ack_latencies = publisher.ack_latencies, None
    phase.published = count
    phase.acked = publisher.acked - start_acked
    phase.deliveries = int(result["delivered"])
    phase.expected = count * nodes.ready
    phase.lost = phase.expected - phase.deliveries
    phase.gaps = int(result["gaps"])
    phase.seconds = round(count * interval, 3)  # the publishing; the Node side reads along
    phase.deliveries_per_s = round(phase.deliveries / max(phase.seconds, 1e-9))
    phase.messages_per_s = round(count / max(phase.seconds, 1e-9), 1)
    phase.p50_ms = ms(percentile(latencies, 50))
    phase.p99_ms = ms(percentile(latencies, 99))
    phase.p999_ms = ms(percentile(latencies, 99.9))
    phase.max_ms = ms(max(latencies) if latencies else None)
    phase.ack_p50_ms = ms(percentile(acks or [], 50))
    phase.ack_p99_ms = ms(percentile(acks or [], 99))
    phase.disconnected = int(result["disconnected"])
    phase.other_frames = {str(k): int(v) for k, v in result.get("others", {}).items()}
    _collections(phase, server, started)
    _cpu_per_delivery(phase, meter, None, None)
    return phase


async def run_case(
    target: Target, subscribers: int, run: int, opts: Options, workdir: Path
) -> Case:
    case = Case(target.name, subscribers, run)
    server = Server(target, workdir, subscribers + 1000, opts.gc_log)
    sessions: list[Session] = []
    door: GuestDoor | None = None
    try:
        await server.start()
        recorder = Recorder()
        url = server.url()
        publishers = [
            await open_session(url, target.dialect, recorder, publisher=True, index=i)
            for i in range(opts.publishers)
        ]
        sessions.extend(publishers)
        await asyncio.sleep(opts.settle)
        case.rss_before = server.rss()
        if opts.node_subscribers:
            case.guests = opts.guests and target.needs_token
            started = time.monotonic()
            nodes = await NodeSubscribers.open(server, subscribers, opts)
            try:
                case.connect_seconds = round(time.monotonic() - started, 3)
                case.connections_per_s = round(nodes.ready / max(case.connect_seconds, 1e-9), 1)
                case.joined = nodes.ready
                if nodes.failed:
                    case.failures = {"node subscriber failed": nodes.failed}
                await asyncio.sleep(opts.settle)
                case.rss_after = server.rss()
                case.bytes_per_connection = round(
                    (case.rss_after - case.rss_before) / max(nodes.ready, 1)
                )
                case.rate = await _node_rate(server, publishers[0], recorder, nodes, opts)
            finally:
                await nodes.close()
            return case
        opener: Callable[[], Awaitable[Session]]
        if opts.guests and target.needs_token:
            case.guests = True
            door = GuestDoor(server, recorder, opts.concurrency, stamped=opts.stamp)
            opener = door.open
        else:
            opener = lambda: open_session(  # noqa: E731
                url, target.dialect, recorder, stamped=opts.stamp
            )
        subs, case.failures, case.connect_seconds = await open_many(
            subscribers, opener, opts.concurrency
        )
        sessions.extend(subs)
        case.connect_seconds = round(case.connect_seconds, 3)
        case.connections_per_s = round(len(subs) / max(case.connect_seconds, 1e-9), 1)
        case.joined = len(subs)
        recorder.members = len(subs)
        await asyncio.sleep(opts.settle)
        case.rss_after = server.rss()
        case.connections_by_process = server.connections_by_process()
        # The generator's own collections would walk every session and delay what it reads
        # (measured: passes of hundreds of ms in the rate phase); it must not measure itself.
        gc.collect()
        gc.freeze()
        if subs:
            case.bytes_per_connection = round((case.rss_after - case.rss_before) / len(subs))
            if opts.burst_seconds > 0:  # 0: the rate phase right after the crowd came in
                case.burst = await _burst(server, publishers, recorder, subs, opts)
            case.rate = await _rate(server, publishers[0], recorder, subs, opts)
    except Exception as exc:  # one failed case is reported; the others still run
        case.error = f"{type(exc).__name__}: {exc!r}"
        print(f"  {target.name}: {case.error}\n{server.log_tail()}", file=sys.stderr)
    finally:
        # Clients first: a server stopping gracefully waits for close handshakes that a
        # blocked generator could not answer.
        for session in sessions:
            if session.ws is not None:
                session.ws.abort()
        gc.unfreeze()
        if door is not None:
            await door.close()
        # In a thread: the loop must go on running to carry out those aborts.
        await asyncio.to_thread(server.stop)
    return case


# --- connections mode --------------------------------------------------------------------------


@dataclass
class ConnectionsCase:
    target: str
    count: int
    run: int
    joined: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    connect_seconds: float = 0.0
    connections_per_s: float = 0.0
    # CPU while connecting, per connect: the server's figure holds on a busy machine, where
    # connections/s also measures what the other processes left of the cores.
    server_cpu_ms_per_connect: float = 0.0
    generator_cpu_ms_per_connect: float = 0.0
    others_cpu_while_connecting: float = 0.0
    load_average: float = 0.0
    dropped_while_idle: int = 0
    close_codes: dict[str, int] = field(default_factory=dict)
    rss_before: int = 0
    rss_after: int = 0
    bytes_per_connection: float = 0.0
    server_cpu_while_idle: float = 0.0
    error: str | None = None


async def run_connections(
    target: Target, count: int, run: int, hold: float, opts: Options, workdir: Path
) -> ConnectionsCase:
    case = ConnectionsCase(target.name, count, run)
    server = Server(target, workdir, max_connections=count + 1000)
    sessions: list[Session] = []
    try:
        await server.start()
        recorder = Recorder()
        url = server.url()
        # One connection first, so that everything loaded lazily is in the "before" figure.
        sessions.append(await open_session(url, target.dialect, recorder, publisher=True))
        await asyncio.sleep(opts.settle)
        case.rss_before = server.rss()
        case.load_average = round(os.getloadavg()[0], 2)
        connecting = CpuMeter(server)
        subs, case.failures, seconds = await open_many(
            count, lambda: open_session(url, target.dialect, recorder), opts.concurrency
        )
        _, generator_cpu, case.others_cpu_while_connecting = connecting.read()
        sessions.extend(subs)
        case.joined = len(subs)
        case.connect_seconds = round(seconds, 3)
        case.connections_per_s = round(count / seconds, 1)
        case.server_cpu_ms_per_connect = round(connecting.server_seconds * 1000 / count, 3)
        case.generator_cpu_ms_per_connect = round(generator_cpu / 100 * seconds * 1000 / count, 3)
        meter = CpuMeter(server)
        await asyncio.sleep(hold)
        case.server_cpu_while_idle = meter.read()[0]
        case.rss_after = server.rss()
        case.bytes_per_connection = round((case.rss_after - case.rss_before) / max(len(subs), 1))
        for session in subs:
            if session.ws is None or not session.ws.is_open:
                case.dropped_while_idle += 1
                code = str(session.ws.close_code if session.ws else None)
                case.close_codes[code] = case.close_codes.get(code, 0) + 1
    except Exception as exc:  # reported in the results, like a failed connection
        case.error = f"{type(exc).__name__}: {exc!r}"
        print(f"  {target.name}: {case.error}\n{server.log_tail()}", file=sys.stderr)
    finally:
        for session in sessions:
            if session.ws is not None:
                session.ws.abort()
        await asyncio.to_thread(server.stop, 60)
    return case


# --- reporting ---------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    """The machine and the versions of everything measured, for the results file."""

    def version(module: str) -> str | None:
        try:
            from importlib.metadata import version as dist_version

            return dist_version(module)
        except Exception:
            return None

    node = None
    if shutil.which("node"):
        node = subprocess.run(
            ["node", "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    sio_node = None
    package = NODE_PEER / "node_modules" / "socket.io" / "package.json"
    if package.is_file():
        sio_node = json.loads(package.read_text())["version"]
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "machine": {
            "cpu": cpu,
            "cores": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "kernel": platform.release(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "open_files_limit": resource.getrlimit(resource.RLIMIT_NOFILE)[0],
        },
        "pinned": None if PIN is None else {"server": sorted(PIN[0]), "generator": sorted(PIN[1])},
        "versions": {
            "python": platform.python_version(),
            "node": node,
            "socket.io (node)": sio_node,
            **{
                name: version(name)
                for name in (
                    "uvicorn",
                    "uvloop",
                    "websockets",
                    "fastapi",
                    "starlette",
                    "python-socketio",
                    "python-engineio",
                    "orjson",
                )
            },
        },
    }


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _sum_phases(case: dict[str, Any], key: str) -> int:
    return sum(int(case[phase][key]) for phase in ("burst", "rate") if case.get(phase))


def summarize(cases: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
    """Medians over runs, per target and number of subscribers."""
    table: dict[str, dict[int, dict[str, Any]]] = {}
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for case in cases:
        groups.setdefault((case["target"], case["subscribers"]), []).append(case)
    for (target, n), runs in sorted(groups.items()):
        ok = [r for r in runs if r.get("rate")]

        def pick(phase: str, key: str, ok: list[dict[str, Any]] = ok) -> float | None:
            return median([(r[phase] or {}).get(key) for r in ok])

        table.setdefault(target, {})[n] = {
            "runs": len(runs),
            "ok_runs": len(ok),
            "deliveries_per_s": pick("burst", "deliveries_per_s"),
            "deliveries_per_cpu_s": median(
                [(r["burst"] or {}).get("deliveries_per_server_cpu_s") or None for r in ok]
            ),
            "messages_per_cpu_s": median(
                [(r["burst"] or {}).get("messages_per_server_cpu_s") or None for r in ok]
            ),
            "messages_per_s": pick("burst", "messages_per_s"),
            "burst_server_cpu": pick("burst", "server_cpu"),
            "burst_generator_cpu": pick("burst", "generator_cpu"),
            "p50_ms": pick("rate", "p50_ms"),
            "p99_ms": pick("rate", "p99_ms"),
            "ack_p99_ms": pick("rate", "ack_p99_ms"),
            "bytes_per_connection": median([r["bytes_per_connection"] for r in ok]),
            "lost": sum(_sum_phases(r, "lost") for r in ok),
            "gaps": sum(_sum_phases(r, "gaps") for r in ok),
            "failures": sum(sum(r["failures"].values()) for r in runs),
            "errors": [r["error"] for r in runs if r.get("error")],
        }
    return table


def _fmt(value: float | None, digits: int = 0) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def print_summary(cases: list[dict[str, Any]]) -> None:
    table = summarize(cases)
    sizes = sorted({n for per in table.values() for n in per})
    header = (
        f"{'target':<15}{'subs':>6}{'deliv/s':>10}{'msg/s':>8}{'srv%':>6}{'gen%':>6}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'KB/conn':>9}{'lost':>6}{'fail':>6}"
    )
    print("\nmedians over runs (burst: deliveries/s; rate phase: latency)")
    print(header)
    for n in sizes:
        for target, per in table.items():
            row = per.get(n)
            if row is None:
                continue
            kb = row["bytes_per_connection"]
            print(
                f"{target:<15}{n:>6}{_fmt(row['deliveries_per_s']):>10}"
                f"{_fmt(row['messages_per_s'], 1):>8}{_fmt(row['burst_server_cpu']):>6}"
                f"{_fmt(row['burst_generator_cpu']):>6}{_fmt(row['p50_ms'], 2):>9}"
                f"{_fmt(row['p99_ms'], 2):>9}{_fmt(kb / 1024 if kb else None, 1):>9}"
                f"{row['lost']:>6}{row['failures']:>6}"
            )
    if "collab" not in table:
        return
    print("\nratios, Collab / peer (deliveries: higher is better; p99 and memory: lower)")
    for n in sizes:
        mine = table["collab"].get(n)
        if mine is None:
            continue
        for target, per in table.items():
            peer = per.get(n)
            if target == "collab" or peer is None:
                continue
            deliveries = _ratio(mine, peer, "deliveries_per_s")
            print(
                f"  {n:>5} subs vs {target:<14} deliveries x{deliveries}"
                f"  p99 x{_ratio(mine, peer, 'p99_ms')}"
                f"  memory x{_ratio(mine, peer, 'bytes_per_connection')}"
            )


def _ratio(mine: dict[str, Any], peer: dict[str, Any], key: str) -> str:
    a, b = mine.get(key), peer.get(key)
    if not a or not b:
        return "-"
    return f"{a / b:.2f}"


def print_connections(cases: list[dict[str, Any]]) -> None:
    print(
        f"\n{'target':<15}{'conns':>7}{'joined':>8}{'fail':>6}{'dropped':>8}"
        f"{'conn/s':>8}{'RSS MB':>8}{'KB/conn':>9}{'idle srv%':>10}"
        f"{'srv ms/conn':>12}{'gen ms/conn':>12}{'others%':>8}{'load':>6}"
    )
    for c in cases:
        print(
            f"{c['target']:<15}{c['count']:>7}{c['joined']:>8}{sum(c['failures'].values()):>6}"
            f"{c['dropped_while_idle']:>8}{_fmt(c['connections_per_s']):>8}"
            f"{_fmt(c['rss_after'] / 2**20, 1):>8}{_fmt(c['bytes_per_connection'] / 1024, 1):>9}"
            f"{_fmt(c['server_cpu_while_idle'], 1):>10}"
            f"{_fmt(c.get('server_cpu_ms_per_connect'), 3):>12}"
            f"{_fmt(c.get('generator_cpu_ms_per_connect'), 3):>12}"
            f"{_fmt(c.get('others_cpu_while_connecting'), 0):>8}"
            f"{_fmt(c.get('load_average'), 1):>6}"
        )
        for reason, n in c["failures"].items():
            print(f"    {n} x {reason}")
        if c.get("error"):
            print(f"    error: {c['error']}")


def _spread(values: Sequence[float | None], digits: int = 0) -> str:
    """`median (min-max)` of the runs, for a Markdown table."""
    present = [v for v in values if v is not None]
    if not present:
        return "-"
    mid = statistics.median(present)
    if len(present) == 1:
        return _fmt(mid, digits)
    return f"{_fmt(mid, digits)} ({_fmt(min(present), digits)}-{_fmt(max(present), digits)})"


def markdown(paths: Sequence[Path]) -> str:
    """Markdown tables of results files: medians over runs, with the runs' range."""
    compare_cases: list[dict[str, Any]] = []
    connection_cases: list[dict[str, Any]] = []
    for path in paths:
        data = json.loads(Path(path).read_text())
        (compare_cases if data["mode"] == "compare" else connection_cases).extend(data["cases"])
    lines: list[str] = []
    labels = {t.name: t.label for t in TARGETS.values()}
    if compare_cases:
        groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
        for case in compare_cases:
            groups.setdefault((case["subscribers"], case["target"]), []).append(case)
        lines += [
            "| subscribers | server | deliveries/s | per server CPU-s | p50 ms | p99 ms "
            "| KB/conn | runs | lost |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for (n, target), runs in sorted(groups.items()):
            ok = [r for r in runs if r.get("rate")]
            lost = sum(_sum_phases(r, "lost") for r in ok)
            bursts = [r["burst"] or {} for r in ok]
            lines.append(
                f"| {n} | {labels.get(target, target)} "
                f"| {_spread([b.get('deliveries_per_s') for b in bursts])} "
                f"| {_fmt(median([b.get('deliveries_per_server_cpu_s') for b in bursts]))} "
                f"| {_spread([r['rate']['p50_ms'] for r in ok], 1)} "
                f"| {_spread([r['rate']['p99_ms'] for r in ok], 1)} "
                f"| {_fmt(median([r['bytes_per_connection'] / 1024 for r in ok]), 1)} "
                f"| {len(ok)}/{len(runs)} | {lost} |"
            )
        table = summarize(compare_cases)
        mine = table.get("collab", {})
        if mine:
            lines += [
                "",
                "| subscribers | peer | Collab's deliveries/s | per server CPU-s | Collab's p99 "
                "| Collab's KB/conn |",
                "|---:|---|---:|---:|---:|---:|",
            ]
            for n in sorted(mine):
                for target, per in table.items():
                    if target == "collab" or n not in per:
                        continue
                    lines.append(
                        f"| {n} | {labels.get(target, target)} "
                        f"| x{_ratio(mine[n], per[n], 'deliveries_per_s')} "
                        f"| x{_ratio(mine[n], per[n], 'deliveries_per_cpu_s')} "
                        f"| x{_ratio(mine[n], per[n], 'p99_ms')} "
                        f"| x{_ratio(mine[n], per[n], 'bytes_per_connection')} |"
                    )
    if compare_cases:
        lines += ["", *per_run_latency(compare_cases), "", *per_run_scale(compare_cases)]
    if connection_cases:
        groups2: dict[str, list[dict[str, Any]]] = {}
        for case in connection_cases:
            groups2.setdefault(case["target"], []).append(case)
        if lines:
            lines.append("")
        lines += [
            "| server | connections | joined | failed | dropped | connections/s "
            "| RSS MB | KB/conn | runs |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for target, runs in groups2.items():
            lines.append(
                f"| {labels.get(target, target)} | {runs[0]['count']} "
                f"| {min(r['joined'] for r in runs)} "
                f"| {max(sum(r['failures'].values()) for r in runs)} "
                f"| {max(r['dropped_while_idle'] for r in runs)} "
                f"| {_spread([r['connections_per_s'] for r in runs])} "
                f"| {_spread([r['rss_after'] / 2**20 for r in runs], 1)} "
                f"| {_spread([r['bytes_per_connection'] / 1024 for r in runs], 1)} "
                f"| {len(runs)} |"
            )
    return "\n".join(lines)


def per_run_latency(cases: list[dict[str, Any]]) -> list[str]:
    """The rate phase's p99 and maximum latency of every run, the targets side by side: a
    tail must be as good in every run, not only in the median of runs."""
    labels = {t.name: t.label for t in TARGETS.values()}
    targets = list(dict.fromkeys(c["target"] for c in cases))
    rows: dict[tuple[int, int], dict[str, dict[str, Any]]] = {}
    guests: dict[tuple[int, int], bool] = {}
    for case in cases:
        key = (case["subscribers"], case["run"])
        rows.setdefault(key, {})[case["target"]] = case
        guests[key] = guests.get(key, False) or bool(case.get("guests"))
    lines = [
        "| subscribers | run | guests | "
        + " | ".join(f"{labels.get(t, t)} p99 / max ms" for t in targets)
        + " |",
        "|---:|---:|---|" + "---:|" * len(targets),
    ]
    for (n, run), per in sorted(rows.items()):
        cells = []
        for target in targets:
            rate = (per.get(target) or {}).get("rate")
            cell = f"{_fmt(rate['p99_ms'], 1)} / {_fmt(rate.get('max_ms'), 1)}" if rate else "-"
            if rate and rate.get("arrival_p99_ms") is not None:  # --stamp
                cell += (
                    f" (received {_fmt(rate['arrival_p99_ms'], 1)} /"
                    f" {_fmt(rate['arrival_max_ms'], 1)})"
                )
            if rate and rate.get("gc_full_passes"):  # --gc-log: full collections in the phase
                cell += f" (GC: {rate['gc_full_passes']}, {_fmt(rate['gc_full_longest_ms'])} ms)"
            cells.append(cell)
        lines.append(
            f"| {n} | {run} | {'yes' if guests[(n, run)] else 'no'} | " + " | ".join(cells) + " |"
        )
    return lines


def per_run_scale(cases: list[dict[str, Any]]) -> list[str]:
    """Every run's throughput, connects and CPU per million deliveries (burst phase)."""
    labels = {t.name: t.label for t in TARGETS.values()}
    lines = [
        "| subscribers | run | server | deliveries/s | connects/s | server CPU-s per M "
        "| Redis CPU-s per M | subscribers per process | lost |",
        "|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for case in sorted(cases, key=lambda c: (c["subscribers"], c["run"])):
        rate = case.get("rate")
        burst = case.get("burst") or {}
        if not rate:
            lines.append(
                f"| {case['subscribers']} | {case['run']} | {labels.get(case['target'])} "
                f"| failed: {case.get('error')} | | | | | |"
            )
            continue
        by_process = case.get("connections_by_process") or []
        spread = " + ".join(str(c) for c in by_process) if len(by_process) > 1 else "-"
        lines.append(
            f"| {case['subscribers']} | {case['run']} | {labels.get(case['target'])} "
            f"| {_fmt(burst.get('deliveries_per_s'))} | {_fmt(case.get('connections_per_s'))} "
            f"| {_fmt(burst.get('server_cpu_s_per_million'), 2)} "
            f"| {_fmt(burst.get('redis_cpu_s_per_million'), 2)} | {spread} "
            f"| {_sum_phases(case, 'lost')} |"
        )
    return lines


def plot(paths: Sequence[Path], out: Path) -> None:
    """Deliveries per second and latency against subscribers, one line per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("plotting needs matplotlib: pip install matplotlib") from None
    cases: list[dict[str, Any]] = []
    for path in paths:
        cases.extend(json.loads(Path(path).read_text())["cases"])
    table = summarize(cases)
    labels = {t.name: t.label for t in TARGETS.values()}
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(17, 4.8))
    for target, per in table.items():
        sizes = sorted(per)
        label = labels.get(target, target)
        width = 2.5 if target == "collab" else 1.5
        left.plot(
            sizes,
            [per[n]["deliveries_per_s"] for n in sizes],
            marker="o",
            linewidth=width,
            label=label,
        )
        middle.plot(
            sizes,
            [per[n]["deliveries_per_cpu_s"] for n in sizes],
            marker="o",
            linewidth=width,
            label=label,
        )
        (line,) = right.plot(
            sizes, [per[n]["p99_ms"] for n in sizes], marker="o", linewidth=width, label=label
        )
        right.plot(
            sizes,
            [per[n]["p50_ms"] for n in sizes],
            marker=".",
            linestyle="--",
            linewidth=1,
            color=line.get_color(),
        )
    middle.set_title("Deliveries per second of server CPU (burst)")
    middle.set_xlabel("subscribers in one room")
    middle.set_ylabel("deliveries per server CPU-second")
    middle.grid(True, alpha=0.3)
    left.set_title("Fan-out throughput (burst phase, medians)")
    left.set_xlabel("subscribers in one room")
    left.set_ylabel("deliveries per second")
    left.grid(True, alpha=0.3)
    left.legend(fontsize=8, loc="lower left")
    right.set_title("Publish-to-delivery latency at the fixed rate (p99 solid, p50 dashed)")
    right.set_xlabel("subscribers in one room")
    right.set_ylabel("milliseconds")
    right.set_yscale("log")
    right.grid(True, alpha=0.3, which="both")
    right.title.set_fontsize(10)
    for axis in (left, middle, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({n for per in table.values() for n in per}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"plot written to {out}")


# --- command line ------------------------------------------------------------------------------


def _targets(spec: str) -> list[Target]:
    chosen: list[Target] = []
    for name in (s.strip() for s in spec.split(",") if s.strip()):
        if name not in TARGETS:
            raise SystemExit(f"unknown target {name!r}; choose from {', '.join(TARGETS)}")
        target = TARGETS[name]
        why = target.available()
        if why is not None:
            print(f"skipping {name}: {why}", file=sys.stderr)
            continue
        chosen.append(target)
    return chosen


def _raise_fd_limit(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if needed > soft:
        print(
            f"warning: {needed} connections need about as many file descriptors; "
            f"this process may open {soft}",
            file=sys.stderr,
        )


def _warn_generator(cpu: float, what: str) -> None:
    if cpu > GENERATOR_CPU_WARNING:
        print(
            f"  warning: the generator used {cpu:.0f}% of a core during {what}; "
            "it may be the bottleneck, not the server",
            file=sys.stderr,
        )


def _write(out: Path, payload: dict[str, Any]) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))


def _with_settings(targets: list[Target], args: argparse.Namespace) -> list[Target]:
    """Collab's settings from `--collab-env` for every Collab target; a `--broker-url` that no
    target uses is a mistake worth stopping for (the figures would be the memory broker's)."""
    extra = tuple(tuple(item.split("=", 1)) for item in args.collab_env)
    if any(len(pair) != 2 for pair in extra):
        raise SystemExit("--collab-env takes NAME=VALUE")
    if BROKER_URL and not any(t.on_redis for t in targets):
        on_broker = ", ".join(n for n, t in TARGETS.items() if t.on_redis)
        raise SystemExit(f"--broker-url: name a target on the broker in --targets ({on_broker})")
    return [
        dataclasses.replace(t, settings=t.settings + extra) if t.needs_token else t for t in targets
    ]


async def compare(args: argparse.Namespace) -> Path:
    targets = _with_settings(_targets(args.targets), args)
    sizes = [int(s) for s in args.subscribers.split(",") if s.strip()]
    if args.node_subscribers:
        if args.burst_seconds > 0 or args.stamp:
            raise SystemExit("--node-subscribers measures the rate phase only: --burst-seconds 0")
        if any(t.dialect != "collab" for t in targets):
            raise SystemExit("--node-subscribers: only targets that speak Collab's protocol")
        missing = node_subscribers_missing()
        if missing:
            raise SystemExit(f"--node-subscribers: {missing}")
    opts = Options(
        window=args.window,
        max_inflight=args.max_inflight,
        burst_seconds=args.burst_seconds,
        rate=args.rate,
        rate_seconds=args.rate_seconds,
        drain_timeout=args.drain_timeout,
        concurrency=args.concurrency,
        settle=args.settle,
        publishers=args.publishers,
        guests=args.guests,
        gc_log=args.gc_log,
        stamp=args.stamp,
        node_subscribers=args.node_subscribers,
    )
    _raise_fd_limit(max(sizes) + 100)
    out = Path(args.out or RESULTS / f"fanout-{time.strftime('%Y%m%d-%H%M%S')}.json")
    payload: dict[str, Any] = {
        "mode": "compare",
        "command": " ".join(["python -m loadtests.fanout", *sys.argv[1:]]),
        "options": {**asdict(opts), "gc_log": str(opts.gc_log) if opts.gc_log else None},
        "environment": environment(),
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        for run, n, target in itertools.product(range(1, args.runs + 1), sizes, targets):
            print(f"run {run}/{args.runs}: {target.name} with {n} subscribers", flush=True)
            workdir = Path(tmp) / f"{target.name}-{n}-{run}"
            workdir.mkdir()
            case = await run_case(target, n, run, opts, workdir)
            _report_case(case)
            payload["cases"].append(asdict(case))
            _write(out, payload)
    print_summary(payload["cases"])
    print(f"\nresults written to {out}")
    if args.plot:
        plot([out], Path(args.plot))
    return out


def _report_case(case: Case) -> None:
    failed = sum(case.failures.values())
    print(
        f"  joined {case.joined}/{case.subscribers} in {case.connect_seconds:.1f}s"
        f" ({case.connections_per_s:,.0f}/s{', guests' if case.guests else ''}; {failed} failed),"
        f" {case.bytes_per_connection / 1024:.1f} KB per connection;"
        f" connections per server process: {case.connections_by_process}"
    )
    for reason, count in case.failures.items():
        print(f"    {count} x {reason}")
    for name, phase in (("burst", case.burst), ("rate", case.rate)):
        if phase is None:
            continue
        latency = ""
        if phase.p50_ms is not None:
            latency = (
                f", p50 {phase.p50_ms:.2f} ms, p99 {phase.p99_ms:.2f} ms, max {phase.max_ms:.2f} ms"
            )
            if phase.max_sent_after_s is not None:  # not known of the Node subscribers'
                latency += (
                    f" (sent at +{phase.max_sent_after_s} s, monotonic {phase.max_sent_monotonic})"
                )
        if phase.arrival_p99_ms is not None:
            latency += (
                f"; as received by the kernel: p50 {phase.arrival_p50_ms:.2f} ms,"
                f" p99 {phase.arrival_p99_ms:.2f} ms, max {phase.arrival_max_ms:.2f} ms"
            )
        if phase.gc_full_passes is not None:
            latency += (
                f", server GC: {phase.gc_full_passes} full passes (longest"
                f" {phase.gc_full_longest_ms} ms, {phase.gc_full_most_objects:,} objects),"
                f" longest pause {phase.gc_longest_ms} ms"
            )
        shares = ""
        if phase.redis_cpu is not None:
            shares = f", Redis {phase.redis_cpu:.0f}% ({phase.redis_cpu_s_per_million} s)"
        if phase.reader_cpu is not None:
            shares += f" (the Node subscribers {phase.reader_cpu:.0f}%)"
        if phase.other_frames:
            latency += f", other frames read {phase.other_frames}"
        print(
            f"  {name}: {phase.published} published, {phase.deliveries_per_s:,} deliveries/s"
            f"{latency}, lost {phase.lost}, gaps {phase.gaps},"
            f" CPU: server {phase.server_cpu:.0f}%, generator {phase.generator_cpu:.0f}%,"
            f" others {phase.others_cpu:.0f}%{shares}; {phase.deliveries_per_server_cpu_s:,}"
            f" deliveries ({phase.server_cpu_s_per_million} s per million) and"
            f" {phase.messages_per_server_cpu_s:,} messages per server CPU-second"
        )
        if phase.redis is not None:
            print(f"  Redis per published message: {phase.redis}")
        _warn_generator(phase.generator_cpu, f"the {name} phase")


async def connections(args: argparse.Namespace) -> Path:
    targets = _targets(args.targets)
    opts = Options(concurrency=args.concurrency, settle=args.settle)
    _raise_fd_limit(args.count + 100)
    out = Path(args.out or RESULTS / f"connections-{time.strftime('%Y%m%d-%H%M%S')}.json")
    payload: dict[str, Any] = {
        "mode": "connections",
        "command": " ".join(["python -m loadtests.fanout", *sys.argv[1:]]),
        "environment": environment(),
        "cases": [],
    }
    with tempfile.TemporaryDirectory(prefix="fanout-") as tmp:
        for run, target in itertools.product(range(1, args.runs + 1), targets):
            print(
                f"run {run}/{args.runs}: {target.name}, {args.count} idle connections", flush=True
            )
            workdir = Path(tmp) / f"{target.name}-{run}"
            workdir.mkdir()
            case = await run_connections(target, args.count, run, args.hold, opts, workdir)
            payload["cases"].append(asdict(case))
            _write(out, payload)
            print_connections([asdict(case)])
    print_connections(payload["cases"])
    print(f"\nresults written to {out}")
    return out


def _loop_run(coro: Awaitable[Path]) -> Path:
    async def main() -> Path:
        # SIGTERM cancels the run, so that `finally` stops the server under test too.
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        return await coro

    try:
        import uvloop
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def _broker_option(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--pin",
        metavar="SERVER:GENERATOR",
        help="run each server on these CPUs and this generator on those (0:1 on 2 cores)",
    )
    command.add_argument(
        "--broker-url",
        help="the broker of the targets collab-redis and collab-redis-2 (redis://HOST:PORT/N or "
        "redis+cluster://HOST:PORT, on this machine); EMPTIED before each of their cases",
    )


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="python -m loadtests.fanout",
        description="Fan-out and connection benchmarks: Collab against peer servers.",
    )
    sub = top.add_subparsers(dest="mode", required=True)
    every = ",".join(n for n, t in TARGETS.items() if not (t.on_redis or t.settings))
    everything = ",".join(TARGETS)

    c = sub.add_parser("compare", help="N subscribers in one room: throughput, latency, memory")
    c.add_argument("--targets", default=every, help=f"comma-separated, from {everything}")
    c.add_argument("--subscribers", default="250,500,1000,2000", help="comma-separated sizes")
    c.add_argument("--runs", type=int, default=3, help="runs of every case (medians reported)")
    c.add_argument("--window", type=int, default=256, help="unacknowledged publishes at most")
    c.add_argument(
        "--publishers",
        type=int,
        default=1,
        help="publishing connections in the burst phase (a connection's commands run one "
        "after another on the server, so one publisher measures latency, several the cost)",
    )
    c.add_argument(
        "--max-inflight",
        type=int,
        default=131072,
        help="deliveries published but not yet read by the subscribers, at most",
    )
    c.add_argument("--burst-seconds", type=float, default=5.0)
    c.add_argument("--rate", type=float, default=10.0, help="messages/s in the rate phase")
    c.add_argument("--rate-seconds", type=float, default=10.0)
    c.add_argument("--drain-timeout", type=float, default=15.0)
    c.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    c.add_argument("--settle", type=float, default=2.0, help="seconds before reading RSS")
    c.add_argument(
        "--collab-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for every Collab server (repeatable)",
    )
    c.add_argument("--out", help="results JSON (default loadtests/results/fanout-<time>.json)")
    c.add_argument("--plot", help="also write the plot to this PNG")
    c.add_argument(
        "--guests",
        action="store_true",
        help="Collab's subscribers each sign in as a guest of their own (REST) and join with "
        "presence events on, as browsers do; the peers get the same number of subscribers",
    )
    c.add_argument(
        "--stamp",
        action="store_true",
        help="subscribers read with recvmsg, and the rate phase also reports latency to the "
        "kernel's receive time of each delivery (SO_TIMESTAMPNS, Linux): the server's part",
    )
    c.add_argument(
        "--node-subscribers",
        action="store_true",
        help="the subscribers are Node `ws` clients in one process (loadtests/node_subscribers, "
        "as the outside harness of issue 10), for the rate phase only (--burst-seconds 0); "
        "targets that speak Collab's protocol",
    )
    c.add_argument(
        "--gc-log",
        help="a folder: the Python servers log their garbage collections there "
        "(loadtests/gclog), and each rate phase reports the full collections it met",
    )
    _broker_option(c)

    k = sub.add_parser("connections", help="many idle joined connections: all must succeed")
    k.add_argument("--targets", default="collab")
    k.add_argument("--count", type=int, default=10_000)
    k.add_argument("--runs", type=int, default=1)
    k.add_argument("--hold", type=float, default=10.0, help="seconds to hold them idle")
    k.add_argument("--concurrency", type=int, default=200)
    k.add_argument("--settle", type=float, default=2.0)
    k.add_argument("--out")
    _broker_option(k)

    r = sub.add_parser("report", help="Markdown tables of results files (medians, ranges)")
    r.add_argument("results", nargs="+", type=Path)

    p = sub.add_parser("plot", help="plot results files of `compare`")
    p.add_argument("results", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=REPO / "docs" / "fanout.png")
    return top


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    global BROKER_URL, PIN
    BROKER_URL = getattr(args, "broker_url", None)
    if getattr(args, "pin", None):
        PIN = parse_pin(args.pin)
        os.sched_setaffinity(0, PIN[1])
    if getattr(args, "gc_log", None):
        args.gc_log = Path(args.gc_log).resolve()
        args.gc_log.mkdir(parents=True, exist_ok=True)
    if args.mode == "report":
        print(markdown(args.results))
        return 0
    if args.mode == "plot":
        plot(args.results, args.out)
        return 0
    out = _loop_run(compare(args) if args.mode == "compare" else connections(args))
    cases = json.loads(out.read_text())["cases"]
    return 1 if any(c.get("error") for c in cases) else 0


if __name__ == "__main__":
    raise SystemExit(main())
