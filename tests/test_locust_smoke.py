"""A headless Locust run of a few users against a real server: it exits 0, and its CSV shows
WebSocket requests (connect, join, publish-ack, delivery) with no failures.

Behaviour only: no timing is asserted. Timings belong to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import ServerProcess, server_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO / "loadtests" / "locustfile.py"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    node = ServerProcess(server_env(tmp_path), tmp_path / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


def locust_command() -> list[str]:
    executable = shutil.which("locust")
    return [executable] if executable else [sys.executable, "-m", "locust"]


def test_headless_locust_run_records_websocket_requests_without_failures(
    server: ServerProcess, tmp_path: Path
) -> None:
    prefix = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCUST_", "COLLAB_LT_"))}
    done = subprocess.run(
        [
            *locust_command(),
            "-f",
            str(LOCUSTFILE),
            "--headless",
            "-u",
            "5",
            "-r",
            "5",
            "-t",
            "8s",
            "--host",
            server.url,
            "--csv",
            str(prefix),
            "--only-summary",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    output = done.stdout[-3000:] + done.stderr[-3000:]
    assert done.returncode == 0, output

    with (tmp_path / "run_stats.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    ws = {row["Name"]: row for row in rows if row["Type"] == "WS"}
    for name in ("connect", "join", "publish-ack", "delivery"):
        assert name in ws, f"no WS {name!r} in the statistics:\n{output}"
        assert int(ws[name]["Request Count"]) > 0
    failed = {name: row["Failure Count"] for name, row in ws.items() if row["Failure Count"] != "0"}
    assert not failed, f"WebSocket failures {failed}:\n{output}\n{server.log()}"
    http_failed = [r["Name"] for r in rows if r["Type"] != "WS" and r["Failure Count"] != "0"]
    assert not http_failed, f"HTTP failures in {http_failed}:\n{output}"
