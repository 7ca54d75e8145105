"""A Redis Cluster of the tests' own: three masters with a replica each, on loopback ports
7100-7199 (their cluster bus on the port + 10000), stopped by PID afterwards.

`redis-server --cluster-enabled yes` six times, then `redis-cli --cluster create ...
--cluster-replicas 1`; the cluster is ready when every node says `cluster_state:ok`. One
cluster serves a whole test session (creating one takes a few seconds); tests keep apart by
their random channel names, and `flush()` empties it between tests that want that.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.processes import require_redis_server
from tests.services import IN_CI

PORTS = range(7100, 7200)
NODE_TIMEOUT_MS = 2000  # how long a silent master has before its replica takes over


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_cluster_ports(count: int) -> list[int]:
    """`count` ports of 7100-7199 whose cluster bus port (+10000) is free as well."""
    found = [p for p in PORTS if _free(p) and _free(p + 10000)][:count]
    if len(found) < count:
        pytest.fail(f"fewer than {count} free ports in 7100-7199 for a Redis Cluster")
    return found


@dataclass
class RedisClusterProcesses:
    workdir: Path
    masters: int = 3
    ports: list[int] = field(default_factory=list)
    processes: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """`redis+cluster://` with every node as a seed (any one would do)."""
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start_node(self, port: int) -> None:
        self.processes[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
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
        self.ports = free_cluster_ports(self.masters * 2)
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
            ["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
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

    def _answers(self, port: int) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def state_ok(self, port: int) -> bool:
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        try:
            info = client.execute_command("CLUSTER", "INFO")
            text = info.decode() if isinstance(info, bytes) else str(info)
            return "cluster_state:ok" in text
        except redis.RedisError:
            return False
        finally:
            client.close()

    def synced(self, port: int) -> bool:
        """A master, or a replica whose link to its master is up."""
        import redis

        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
        try:
            info = client.info("replication")
            return info.get("role") == "master" or info.get("master_link_status") == "up"
        except redis.RedisError:
            return False
        finally:
            client.close()

    def master_of(self, key: str) -> int:
        """The port of the master that owns `key`'s slot now."""
        import redis
        from redis.cluster import RedisCluster

        for port in self.ports:
            if port not in self.processes:
                continue
            with contextlib.suppress(redis.RedisError):
                client = RedisCluster(host="127.0.0.1", port=port, socket_timeout=1)
                try:
                    node = client.get_node_from_key(key)
                    return int(node.port)
                finally:
                    client.close()
        raise RuntimeError("no node of the cluster answers")

    def flush(self) -> None:
        import redis

        for port in list(self.processes):
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1)
            with contextlib.suppress(redis.RedisError):  # replicas refuse writes
                client.flushall()
            client.close()

    def kill(self, port: int) -> None:
        """SIGKILL one node (by its PID)."""
        process = self.processes.pop(port)
        process.kill()
        process.wait(5)

    def stop(self) -> None:
        for port in list(self.processes):
            self.kill(port)
