"""A Redis Cluster of the tests' own: three masters with a replica each, on loopback ports
7100-7199 (their cluster bus on the port + 10000; COLLAB_TEST_CLUSTER_PORTS=7300-7399 moves
them, for runs side by side; each further xdist worker takes the next hundred), stopped by
PID afterwards.

`redis-server --cluster-enabled yes` six times, then `redis-cli --cluster create ...
--cluster-replicas 1`; the cluster is ready when every node says `cluster_state:ok`. One
cluster serves a whole test session (creating one takes a few seconds); tests keep apart by
their random channel names, and `flush()` empties it between tests that want that.

With `tls=ClusterTls.make(folder)` the nodes speak TLS only (`--port 0 --tls-port P`), on the
cluster bus and for replication too, and ask every client for a certificate of the test's CA
(Redis's default, `tls-auth-clients yes`).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest

from tests.certificates import CertificateAuthority, Issued
from tests.processes import require_redis_server
from tests.services import IN_CI, WORKER_INDEX

_FIRST, _, _LAST = os.environ.get("COLLAB_TEST_CLUSTER_PORTS", "7100-7199").partition("-")
# Each xdist worker picks from a range of its own: two picking free ports from one range at
# once could both take the same.
_SHIFT = (int(_LAST) - int(_FIRST) + 1) * WORKER_INDEX
PORTS = range(int(_FIRST) + _SHIFT, int(_LAST) + 1 + _SHIFT)
NODE_TIMEOUT_MS = 2000  # how long a silent master has before its replica takes over


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_ports(count: int) -> list[int]:
    """`count` ports of PORTS whose cluster bus port (+10000) is free as well."""
    found = [p for p in PORTS if _free(p) and _free(p + 10000)][:count]
    if len(found) < count:
        pytest.fail(f"fewer than {count} free ports in {PORTS} for a Redis Cluster")
    return found


@dataclass(frozen=True)
class ClusterTls:
    """A TLS cluster's files: the CA its clients trust, the certificate its nodes serve and
    present to each other (for 127.0.0.1, the address they announce), and a client's."""

    authority: CertificateAuthority
    node: Issued
    client: Issued

    @classmethod
    def make(cls, folder: Path) -> ClusterTls:
        ca = CertificateAuthority(folder)
        node = ca.issue("redis-node", ips=("127.0.0.1",))
        return cls(ca, node, ca.issue("collab-client", server=False))

    @property
    def ca(self) -> Path:
        return self.authority.cert

    def server_args(self) -> list[str]:
        return ["--tls-cluster", "yes", "--tls-replication", "yes",
                "--tls-cert-file", str(self.node.cert), "--tls-key-file", str(self.node.key),
                "--tls-ca-cert-file", str(self.ca)]  # fmt: skip

    def cli_args(self) -> list[str]:
        return ["--tls", "--cacert", str(self.ca),
                "--cert", str(self.node.cert), "--key", str(self.node.key)]  # fmt: skip

    def client_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments (and the URL's query) for a client of the cluster."""
        return {
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client.cert),
            "ssl_keyfile": str(self.client.key),
        }


@dataclass
class RedisClusterProcesses:
    workdir: Path
    masters: int = 3
    replicas: int = 1  # per master
    tls: ClusterTls | None = None
    ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)
    _clients: dict[int, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """`redis+cluster://` (`rediss+cluster://` with the client's TLS files) with every node
        as a seed (any one would do)."""
        seeds = ",".join(f"127.0.0.1:{p}" for p in self.ports)
        if self.tls is None:
            return f"redis+cluster://{seeds}"
        return f"rediss+cluster://{seeds}?{urlencode(self.tls.client_options(), safe='/')}"

    def start_node(self, port: int) -> None:
        listen = ["--port", str(port)]
        if self.tls is not None:
            listen = ["--port", "0", "--tls-port", str(port), *self.tls.server_args()]
        self.processes[port] = subprocess.Popen(
            ["redis-server", *listen, "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir), "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip

    def start(self, timeout: float = 30.0) -> None:
        require_redis_server()
        if shutil.which("redis-cli") is None:
            message = "redis-cli is not installed (it creates the Redis Cluster)"
            if IN_CI:
                pytest.fail(f"{message}; CI must provide it")
            pytest.skip(message)
        self.ports = free_cluster_ports(self.masters * (1 + self.replicas))
        for port in self.ports:
            self.start_node(port)
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while not self._answers(port):
                if time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"redis-server on {port} did not start")
                time.sleep(0.02)
        created = subprocess.run(
            ["redis-cli", *(self.tls.cli_args() if self.tls else []),
             "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )  # fmt: skip
        if created.returncode != 0:
            self.stop()
            pytest.fail(f"redis-cli --cluster create failed: {created.stdout!r}")
        # Ready when every node says so and every replica has its master's data: a replica
        # still in its first sync cannot take over, and a failover test would wait forever.
        while not all(self.state_ok(p) and self.synced(p) for p in self.ports):
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail("the Redis Cluster did not reach cluster_state:ok")
            time.sleep(0.05)

    def client_options(self) -> dict[str, Any]:
        """redis-py's keyword arguments to reach a node: TLS with the client's files, if any."""
        if self.tls is None:
            return {}
        return {"ssl": True, **self.tls.client_options()}

    def node_client(self, port: int, **options: Any) -> Any:
        """A new plain redis-py client of one node (not following the cluster); close it."""
        import redis

        options = {"socket_timeout": 1, **self.client_options(), **options}
        return redis.Redis(host="127.0.0.1", port=port, **options)

    def _node(self, port: int) -> Any:
        """This helper's own client of a node, kept: redis-py builds a TLS context (loading
        the system's CA store) for every new connection, a tenth of a second on a busy
        machine, too slow for loops that poll every node."""
        client = self._clients.get(port)
        if client is None:
            client = self._clients[port] = self.node_client(port)
        return client

    def _ask(self, port: int, *command: Any) -> Any:
        """A command's reply from one node; None when it does not answer."""
        import redis

        try:
            return self._node(port).execute_command(*command)
        except redis.RedisError:
            return None

    def _answers(self, port: int) -> bool:
        return bool(self._ask(port, "PING"))

    def state_ok(self, port: int) -> bool:
        info = self._ask(port, "CLUSTER", "INFO")
        return info is not None and b"cluster_state:ok" in info

    def synced(self, port: int) -> bool:
        """A master, or a replica whose link to its master is up."""
        info = self._ask(port, "INFO", "replication") or {}
        return info.get("role") == "master" or info.get("master_link_status") == "up"

    def master_of(self, key: str) -> int:
        """The port of the master that owns `key`'s slot now, as the first node that answers
        sees it."""
        for master in self.masters_seen(key, every=False):
            return master
        raise RuntimeError("no node of the cluster answers")

    def masters_seen(self, key: str, *, every: bool = True) -> list[int]:
        """The port of the master owning `key`'s slot as each node that answers sees it (only
        the first, unless `every`): one port throughout once a failover reached every node."""
        from redis.crc import key_slot

        slot = key_slot(key.encode())
        seen = []
        for port in list(self.processes):
            for first, last, master, *_ in self._ask(port, "CLUSTER", "SLOTS") or []:
                if first <= slot <= last:
                    seen.append(int(master[1]))
                    if not every:
                        return seen
        return seen

    def flush(self) -> None:
        for port in list(self.processes):
            self._ask(port, "FLUSHALL")  # replicas refuse writes

    def kill(self, port: int) -> None:
        """SIGKILL one node (by its PID)."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(5)
        client = self._clients.pop(port, None)
        if client is not None:
            client.close()

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)
