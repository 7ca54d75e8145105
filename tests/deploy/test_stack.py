"""The demo stack, up with `deploy/stack.sh up`: PostgreSQL, Redis, migrations, two hub nodes, a
Celery worker and NGINX, all in podman containers, with a certificate certbot gets from Pebble
(Let's Encrypt's test ACME server) through NGINX's HTTP-01 path. One stack serves every test
here, in order: chat over wss:// across the nodes into PostgreSQL, a forced renewal that
reloads NGINX under open WebSockets, and `stack.sh upgrade` (a rolling restart of the nodes,
then the worker) under live chat with 100 clients and a publisher.

Clients trust Pebble's root certificate only, and reach the site by its name (SNI) on
127.0.0.1, as Pebble's DNS (pebble-challtestsrv) answers every name with 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.typing import Origin

from tests.deploy.tools import DEPLOY, require_program
from tests.services import free_port

pytestmark = [pytest.mark.slow, pytest.mark.deploy, pytest.mark.timeout(900)]

DOMAIN = "collab.test"
CLIENTS = 100
# Every WebSocket a test opened, so that one failing test does not leave its sockets to the
# next one (an unclosed socket found by the garbage collector fails whichever test runs then).
OPENED: list[ClientConnection] = []


@pytest.fixture(autouse=True)
async def close_websockets() -> AsyncIterator[None]:
    yield
    opened = OPENED[:]
    OPENED.clear()
    for connection in opened:
        try:
            await asyncio.wait_for(connection.close(), 2)
        except Exception:
            connection.transport.abort()


# --- the ACME server --------------------------------------------------------------------------


@dataclass
class Acme:
    directory: str
    server_ca: Path  # what certbot trusts for the ACME server's own HTTPS
    root: Path  # Pebble's root: what issued certificates chain to
    http_port: int  # where Pebble validates HTTP-01: NGINX's plain HTTP port


def _spawn(
    args: list[str], log: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    with log.open("wb") as output:
        return subprocess.Popen(
            args, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 20
    while True:
        with contextlib.suppress(OSError):
            import socket

            with socket.create_connection(("127.0.0.1", port), 1):
                return
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"could not start {process.args!r}: {log.read_text()[-2000:]}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def acme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Acme]:
    pebble = require_program("pebble")
    challtestsrv = require_program("pebble-challtestsrv", "pebble")
    require_program("certbot")
    folder = tmp_path_factory.mktemp("pebble")
    cert, key = folder / "acme.crt", folder / "acme.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=pebble", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    acme_port, management, dns, http_port = free_port(), free_port(), free_port(), free_port()
    (folder / "pebble.json").write_text(
        json.dumps(
            {
                "pebble": {
                    "listenAddress": f"127.0.0.1:{acme_port}",
                    "managementListenAddress": f"127.0.0.1:{management}",
                    "certificate": str(cert),
                    "privateKey": str(key),
                    "httpPort": http_port,
                    "tlsPort": free_port(),
                    "ocspResponderURL": "",
                    "externalAccountBindingRequired": False,
                }
            }
        )
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        chall_log = folder / "challtestsrv.log"
        # Pebble's DNS: every name is 127.0.0.1, so HTTP-01 lands on the stack's NGINX.
        processes.append(
            _spawn(
                [challtestsrv, "-defaultIPv4", "127.0.0.1", "-defaultIPv6", "",
                 "-dns01", f"127.0.0.1:{dns}", "-http01", "", "-https01", "",
                 "-tlsalpn01", "", "-management", f"127.0.0.1:{free_port()}"],
                chall_log,
            )
        )  # fmt: skip
        _wait_port(dns, processes[-1], chall_log)
        pebble_log = folder / "pebble.log"
        # No random sleep before validating, no nonces rejected on purpose: a quick, steady test.
        env = {**os.environ, "PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0"}
        processes.append(
            _spawn(
                [pebble, "-config", str(folder / "pebble.json"), "-dnsserver", f"127.0.0.1:{dns}"],
                pebble_log,
                env,
            )
        )
        _wait_port(acme_port, processes[-1], pebble_log)
        _wait_port(management, processes[-1], pebble_log)
        root = folder / "pebble-root.pem"
        root.write_text(
            httpx.get(
                f"https://127.0.0.1:{management}/roots/0",
                verify=ssl.create_default_context(cafile=str(cert)),
            ).text
        )
        yield Acme(f"https://127.0.0.1:{acme_port}/dir", cert, root, http_port)
    finally:
        for process in processes:
            process.terminate()
            process.wait(10)


# --- the stack --------------------------------------------------------------------------------


@dataclass
class Stack:
    env: dict[str, str]
    folder: Path
    https_port: int
    http_port: int
    pg_port: int
    context: ssl.SSLContext

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [str(DEPLOY / "stack.sh"), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout, check=False,
        )  # fmt: skip
        assert result.returncode == 0, f"stack.sh {' '.join(args)}:\n{result.stderr[-4000:]}"
        return result

    @property
    def origin(self) -> str:
        return f"https://{DOMAIN}:{self.https_port}"

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """To the site by its name (Host and SNI) on 127.0.0.1, trusting Pebble's root only."""
        with httpx.Client(verify=self.context, timeout=10) as client:
            return client.request(
                method,
                f"https://127.0.0.1:{self.https_port}{path}",
                headers={"Host": f"{DOMAIN}:{self.https_port}"},
                extensions={"sni_hostname": DOMAIN},
                **kwargs,
            )

    def get(self, path: str) -> httpx.Response:
        return self.request("GET", path)

    def guest(self, name: str) -> str:
        response = self.request("POST", "/auth/guest", json={"name": name})
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token

    async def connect(self, token: str) -> ClientConnection:
        connection = await connect(
            f"wss://127.0.0.1:{self.https_port}/ws/chat?token={token}",
            ssl=self.context,
            server_hostname=DOMAIN,
            origin=Origin(self.origin),
            compression=None,
            open_timeout=10,
        )
        OPENED.append(connection)
        return connection

    def served_certificate_serial(self) -> int:
        import socket

        context = ssl.create_default_context(cafile=str(self.env["_ROOT"]))
        with (
            socket.create_connection(("127.0.0.1", self.https_port), 5) as raw,
            context.wrap_socket(raw, server_hostname=DOMAIN) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der is not None
        from cryptography import x509

        return x509.load_der_x509_certificate(der).serial_number

    async def stored(self, room: str) -> list[tuple[int, str]]:
        password = next(
            line.split("=", 1)[1]
            for line in (self.folder / "secrets.env").read_text().splitlines()
            if line.startswith("POSTGRES_PASSWORD=")
        )
        connection = await asyncpg.connect(
            host="127.0.0.1", port=self.pg_port, user="collab", password=password, database="collab"
        )
        try:
            rows = await connection.fetch(
                'SELECT "offset", msg_id FROM messages WHERE room = $1 ORDER BY "offset"', room
            )
        finally:
            await connection.close()
        return [(row["offset"], row["msg_id"]) for row in rows]


@pytest.fixture(scope="module")
def stack(
    collab_image: str, acme: Acme, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    require_program("openssl")
    folder = tmp_path_factory.mktemp("stack")
    name = f"collabtest{uuid.uuid4().hex[:6]}"
    https_port, pg_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")},
        "COLLAB_STACK_NAME": name,
        "COLLAB_STACK_DIR": str(folder),
        "COLLAB_IMAGE": collab_image,
        "COLLAB_DOMAIN": DOMAIN,
        "COLLAB_HTTP_PORT": str(acme.http_port),
        "COLLAB_HTTPS_PORT": str(https_port),
        "COLLAB_HUB_PORTS": f"{free_port()} {free_port()}",
        "COLLAB_POSTGRES_PORT": str(pg_port),
        "COLLAB_REDIS_PORT": str(free_port()),
        "COLLAB_ACME_DIRECTORY": acme.directory,
        "COLLAB_ACME_CA_BUNDLE": str(acme.server_ca),
        # A hundred clients on one address: NGINX's per-address cap and the server's sign-in
        # limit are raised for the test (both are tested apart).
        "COLLAB_WS_PER_ADDRESS": "1000",
        "_ROOT": str(acme.root),
    }
    (folder / "extra.env").write_text(
        "COLLAB_AUTH_RATE_LIMIT=10000\nCOLLAB_AUTH_RATE_BURST=10000\n"
        "COLLAB_RATE_LIMIT=10000\nCOLLAB_RATE_BURST=10000\n"
    )
    context = ssl.create_default_context(cafile=str(acme.root))  # Pebble's root, nothing else
    stack = Stack(env, folder, https_port, acme.http_port, pg_port, context)
    try:
        stack.run("up", timeout=600)
        yield stack
    finally:
        status = subprocess.run(
            [str(DEPLOY / "stack.sh"), "status"], env=env, capture_output=True, text=True,
            timeout=120, check=False,
        )  # fmt: skip
        print(status.stdout)
        for service in ("nginx", "hub1", "hub2", "worker"):
            logs = subprocess.run(
                [str(DEPLOY / "stack.sh"), "logs", service], env=env, capture_output=True,
                text=True, timeout=60, check=False,
            )  # fmt: skip
            (folder / f"{service}.log").write_text(logs.stdout + logs.stderr)
        print(f"logs in {folder}")
        down = subprocess.run(
            [str(DEPLOY / "stack.sh"), "down", "--volumes"], env=env, capture_output=True,
            text=True, timeout=300, check=False,
        )  # fmt: skip
        assert down.returncode == 0, down.stderr


# --- a chat client that reconnects and recovers ------------------------------------------------


@dataclass
class Member:
    """A room member that keeps every message event it got, and on 1001 reconnects (through
    NGINX, to whichever node) and joins again from the last offset it saw."""

    stack: Stack
    token: str
    room: str
    offsets: list[int] = field(default_factory=list)
    handovers: int = 0
    nodes: set[str] = field(default_factory=set)
    epoch: str = ""
    ws: ClientConnection | None = None
    stopping: bool = False
    history: list[str] = field(default_factory=list)  # what happened, for a failure's message

    async def join(self) -> None:
        while True:
            try:
                await self._join()
                return
            except (OSError, InvalidStatus, TimeoutError, ConnectionClosed) as exc:
                # The node NGINX picked is going away (it may still accept, then say 1001) or
                # none is up yet: try again, as a browser client would.
                self.history.append(f"join failed: {exc!r}"[:300])
                await asyncio.sleep(0.2)

    async def _join(self) -> None:
        self.ws = await self.stack.connect(self.token)
        welcome = orjson.loads(await self.ws.recv())
        command: dict[str, Any] = {"type": "join", "room": self.room, "id": 1}
        if self.epoch:
            command["since"] = {"epoch": self.epoch, "offset": self.last}
        await self.ws.send(orjson.dumps(command).decode())
        while True:
            frame = orjson.loads(await self.ws.recv())
            if frame.get("id") == 1:
                break
        assert frame["type"] == "joined", frame
        if self.epoch:
            assert frame["recovered"] is True and frame["epoch"] == self.epoch, frame
        self.nodes.add(welcome["node"])
        self.history.append(
            f"joined {welcome['node']} since {command.get('since')}: offset {frame['offset']}, "
            f"missed {[m['offset'] for m in frame['missed']]}"
        )
        self.epoch = frame["epoch"]
        for message in frame["missed"]:
            self.offsets.append(message["offset"])

    @property
    def last(self) -> int:
        return self.offsets[-1] if self.offsets else 0

    async def run(self) -> None:
        while not self.stopping:
            assert self.ws is not None
            try:
                frame = orjson.loads(await self.ws.recv())
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
            else:
                if frame.get("type") == "message" and frame.get("room") == self.room:
                    self.offsets.append(frame["offset"])
                continue
            if self.stopping:
                return
            # Only a server going away (1001, "reconnect and recover") may end a connection.
            assert code == 1001, f"closed with {code}"
            self.handovers += 1
            await self.join()

    async def close(self) -> None:
        self.stopping = True
        if self.ws is not None:
            await self.ws.close()


@dataclass
class Publisher:
    """Publishes numbered messages; a publish cut off by 1001 is sent again, with the same
    client_msg_id, once reconnected (the server acknowledges it once)."""

    stack: Stack
    token: str
    room: str
    acked: dict[int, str] = field(default_factory=dict)  # offset -> msg_id
    handovers: int = 0
    ws: ClientConnection | None = None

    async def connect(self) -> None:
        while True:
            try:
                self.ws = await self.stack.connect(self.token)
                await self.ws.recv()  # welcome
                # A member of the room may publish to it (its own messages come back too).
                await self.ws.send(
                    orjson.dumps({"type": "join", "room": self.room, "id": 0}).decode()
                )
                while (frame := orjson.loads(await self.ws.recv())).get("id") != 0:
                    pass
                assert frame["type"] == "joined", frame
                return
            except (OSError, InvalidStatus, TimeoutError, ConnectionClosed):
                await asyncio.sleep(0.2)

    async def publish(self, n: int) -> None:
        command = {"type": "publish", "room": self.room, "body": {"n": n},
                   "client_msg_id": f"p{n}", "id": n}  # fmt: skip
        while True:
            assert self.ws is not None
            try:
                await self.ws.send(orjson.dumps(command).decode())
                while True:
                    frame = orjson.loads(await asyncio.wait_for(self.ws.recv(), 10))
                    if frame.get("id") == n:
                        break
            except ConnectionClosed:
                self.handovers += 1
                await self.connect()
                continue
            assert frame["type"] == "ack", frame
            assert frame["offset"] not in self.acked, f"acknowledged twice: {frame}"
            self.acked[frame["offset"]] = frame["msg_id"]
            return


async def _all_caught_up(
    members: list[Member], readers: list[asyncio.Task[None]], last: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while any(m.last < last for m in members):
        for reader in readers:
            if reader.done():
                reader.result()  # a member that failed says why
        if time.monotonic() > deadline:
            behind = [m for m in members if m.last < last]
            pytest.fail(
                f"{len(behind)} members behind offset {last} after {timeout}s: "
                f"{[(m.last, m.handovers) for m in behind]}; one of them: {behind[0].history[-6:]}"
            )
        await asyncio.sleep(0.1)


# --- the tests --------------------------------------------------------------------------------


def test_http_redirects_to_https_and_the_certificate_is_pebbles(stack: Stack) -> None:
    response = httpx.get(
        f"http://127.0.0.1:{stack.http_port}/chat", headers={"Host": DOMAIN}, timeout=10
    )
    assert response.status_code == 301
    assert response.headers["location"] == f"https://{DOMAIN}:{stack.https_port}/chat"
    # Verified against Pebble's root alone: the certificate came from the ACME server.
    assert stack.get("/healthz").status_code == 200
    assert stack.get("/readyz").status_code == 200
    status = stack.run("status").stdout
    assert status.count("running healthy") == 6, status


async def test_wss_chat_across_both_nodes_reaches_postgres(stack: Stack) -> None:
    room = f"stack-{uuid.uuid4().hex[:8]}"
    members: dict[str, Member] = {}
    # least_conn spreads connections; keep one member per node.
    for i in range(10):
        member = Member(stack, stack.guest(f"g{i}"), room)
        await member.join()
        node = next(iter(member.nodes))
        if node in members:
            await member.close()
        else:
            members[node] = member
        if len(members) == 2:
            break
    assert set(members) == {"hub1", "hub2"}
    readers = [asyncio.create_task(m.run()) for m in members.values()]
    publisher = Publisher(stack, stack.guest("pub"), room)
    await publisher.connect()
    for n in range(1, 6):
        await publisher.publish(n)
    await _all_caught_up(list(members.values()), readers, 5, 10)
    for member in members.values():
        assert member.offsets == [1, 2, 3, 4, 5]
        await member.close()
    await asyncio.gather(*readers)
    assert publisher.ws is not None
    await publisher.ws.close()

    async def stored() -> list[tuple[int, str]]:
        deadline = time.monotonic() + 60
        while (rows := await stack.stored(room)) != sorted(publisher.acked.items()):
            assert time.monotonic() < deadline, f"stored {rows}, acked {publisher.acked}"
            await asyncio.sleep(0.5)
        return rows

    assert len(await stored()) == 5


async def test_forced_renewal_reloads_nginx_under_open_websockets(stack: Stack) -> None:
    room = f"renew-{uuid.uuid4().hex[:8]}"
    members = [Member(stack, stack.guest(f"r{i}"), room) for i in range(10)]
    for member in members:
        await member.join()
    readers = [asyncio.create_task(m.run()) for m in members]
    publisher = Publisher(stack, stack.guest("rpub"), room)
    await publisher.connect()
    before = stack.served_certificate_serial()
    await publisher.publish(1)

    await asyncio.to_thread(stack.run, "renew", "--force")
    # New TLS connections get the new certificate: NGINX reloaded (`nginx -s reload` returns
    # before the new workers take over, so a moment's wait)...
    deadline = time.monotonic() + 10
    while stack.served_certificate_serial() == before:
        assert time.monotonic() < deadline, "NGINX still serves the old certificate"
        await asyncio.sleep(0.2)
    # ...and the open WebSockets go on being served (any that dropped recovered).
    for n in range(2, 12):
        await publisher.publish(n)
    await _all_caught_up(members, readers, 11, 20)
    for member in members:
        assert member.offsets == list(range(1, 12))
        await member.close()
    await asyncio.gather(*readers)
    assert publisher.ws is not None
    await publisher.ws.close()


async def test_rolling_restart_under_live_chat_hands_every_client_over(stack: Stack) -> None:
    room = f"roll-{uuid.uuid4().hex[:8]}"
    tokens = await asyncio.gather(
        *(asyncio.to_thread(stack.guest, f"m{i}") for i in range(CLIENTS))
    )
    members = [Member(stack, token, room) for token in tokens]
    for start in range(0, CLIENTS, 20):
        await asyncio.gather(*(m.join() for m in members[start : start + 20]))
    readers = [asyncio.create_task(m.run()) for m in members]
    publisher = Publisher(stack, stack.guest("roller"), room)
    await publisher.connect()

    stop = asyncio.Event()

    async def publish_until_stopped() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            await publisher.publish(n)
            await asyncio.sleep(0.05)

    publishing = asyncio.create_task(publish_until_stopped())
    await asyncio.sleep(1)
    # `upgrade`: the image rebuilt (from cache: nothing changed), migrations, the hubs rolled
    # one after the other (`rolling-restart`), then the worker replaced.
    restart = await asyncio.to_thread(stack.run, "upgrade", timeout=600)
    await asyncio.sleep(1)
    stop.set()
    await publishing
    # Live delivery goes on after the restart, message by message.
    for n in range(10_000, 10_003):
        await asyncio.sleep(0.2)
        await publisher.publish(n)

    last = max(publisher.acked)
    # Every acknowledged message is an offset, and the offsets run 1..last without a gap.
    assert sorted(publisher.acked) == list(range(1, last + 1))
    await _all_caught_up(members, readers, last, 60)
    for member in members:
        # Each member got every message once, in order: nothing lost, nothing repeated.
        assert member.offsets == list(range(1, last + 1)), (member.handovers, member.nodes)
        # Both nodes restarted: every member was on one of them and was handed over.
        assert member.handovers >= 1
        await member.close()
    await asyncio.gather(*readers)
    assert publisher.ws is not None
    await publisher.ws.close()
    assert "hub1 is healthy" in restart.stderr and "hub2 is healthy" in restart.stderr

    deadline = time.monotonic() + 120
    while (rows := await stack.stored(room)) != sorted(publisher.acked.items()):
        assert time.monotonic() < deadline, f"stored {len(rows)} rows, acked {last}"
        await asyncio.sleep(1)
