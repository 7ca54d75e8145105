"""Real server processes for end-to-end tests: started on free loopback ports, stopped by PID."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.services import IN_CI, free_port

# The app under uvicorn's wsproto protocol: an ASGI server where frames go through `send`.
UVICORN_WSPROTO = [
    "-m",
    "uvicorn",
    "--factory",
    "collab.app:create_app_from_env",
    "--host",
    "127.0.0.1",
    "--port",
    "{port}",
    "--ws",
    "wsproto",
]


@dataclass
class ServerProcess:
    """One `collab serve` process: a hub node with its own port.

    `command` replaces `collab serve --port <port>` (its `{port}` is filled in), for a test of
    the app under another server.
    """

    env: dict[str, str]
    log_path: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    command: list[str] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = self.log_path.open("ab")
        command = self.command or ["-m", "collab", "serve", "--port", "{port}"]
        self.process = subprocess.Popen(
            [sys.executable, *(part.format(port=self.port) for part in command)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server did not answer within {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def signal(self, sig: signal.Signals) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL if it does not go in time."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


def server_env(tmp_path: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for a server: embedded defaults in a temporary folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")}
    env.update(
        {
            "COLLAB_ENV": "test",
            "COLLAB_DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'collab.db'}",
            "COLLAB_SECRET_KEY": "e2e-secret-" + "z" * 40,
            # Tests make many guests from one address; the limit itself is tested apart.
            "COLLAB_AUTH_RATE_LIMIT": "10000",
            "COLLAB_AUTH_RATE_BURST": "10000",
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra or {})
    return env


@dataclass
class RedisServer:
    """A redis-server of a test's own on a free port, so the test may stop or kill it; only
    ever by its PID. `persistent` keeps every write (AOF, fsync always) across a restart."""

    workdir: Path
    persistent: bool = False
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.persistent
            else ["--appendonly", "no"]
        )
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             *persistence, "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        import redis

        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(redis.RedisError):
                client = redis.Redis.from_url(self.url, socket_timeout=1)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail("could not start a redis-server for the test")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
        self.process = None

    stop = kill


def require_redis_server() -> None:
    """Skip (laptop) or fail (CI) when there is no redis-server program to start."""
    if shutil.which("redis-server") is None:
        if IN_CI:
            pytest.fail("redis-server is not installed; CI must provide it")
        pytest.skip("redis-server is not installed")
