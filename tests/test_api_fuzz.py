"""Schemathesis against a real server: generated requests from the OpenAPI schema, no 500s."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.processes import ServerProcess, server_env

# Some 40 examples for every operation: about a minute here, several on a busy machine.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    node = ServerProcess(server_env(tmp_path), tmp_path / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


def test_schemathesis_finds_no_server_error(server: ServerProcess, tmp_path: Path) -> None:
    executable = shutil.which("schemathesis") or shutil.which("st")
    assert executable, "schemathesis is part of the test extra"
    token = httpx.post(f"{server.url}/auth/guest", json={"name": "fuzzer"}).json()["access_token"]
    result = subprocess.run(
        [
            executable,
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            "not_a_server_error",
            "--max-examples",
            "40",
            "--seed",
            "20261126",
            "--generation-database",
            "none",
            "--request-timeout",
            "10",
            "-H",
            f"Authorization: Bearer {token}",
        ],
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
        cwd=tmp_path,  # its cache of crashes stays out of the work tree
    )
    report = result.stdout[-6000:] + result.stderr[-2000:]
    assert result.returncode == 0, report + "\n--- server log ---\n" + server.log()
