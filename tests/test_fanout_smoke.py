"""A tiny run of the fan-out benchmark (`python -m loadtests.fanout`): every message reaches
every subscriber, in order, against Collab and the plain `websockets` reference peer.

Behaviour only: the figures themselves (deliveries per second, latency, memory) are never
asserted here; they belong to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("reader", ["read", "stamped", "node"])
def test_small_fanout_run_loses_no_message(tmp_path: Path, reader: str) -> None:
    """`--stamp` reads the subscribers with recvmsg (`loadtests.rawws.StampedTransport`) and
    adds the latency to the kernel's receive time of each delivery; `--node-subscribers` reads
    them in a Node process of `ws` clients (the rate phase only), each signed in as a guest."""
    if reader == "node" and shutil.which("node") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is missing: .ci/run installs it")
        pytest.skip("node is not installed")
    stamp = reader == "stamped"
    extra = {
        "read": [],
        "stamped": ["--stamp"],
        "node": ["--node-subscribers", "--guests", "--burst-seconds", "0"],
    }[reader]
    out = tmp_path / "fanout.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "loadtests.fanout",
            "compare",
            "--targets",
            "collab,websockets",
            "--subscribers",
            "20",
            "--runs",
            "1",
            "--burst-seconds",
            "1",
            "--rate",
            "20",
            "--rate-seconds",
            "1",
            "--settle",
            "0.2",
            "--out",
            str(out),
            *extra,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, output
    cases = json.loads(out.read_text())["cases"]
    assert {case["target"] for case in cases} == {"collab", "websockets"}, output
    for case in cases:
        assert case["error"] is None, output
        assert case["joined"] == 20 and case["failures"] == {}, output
        if reader == "node":
            assert case["burst"] is None and case["guests"] is (case["target"] == "collab")
        for phase in (case["rate"],) if reader == "node" else (case["burst"], case["rate"]):
            assert phase["published"] > 0, output
            assert phase["acked"] == phase["published"], output
            assert phase["deliveries"] == phase["expected"] == phase["published"] * 20, output
            assert phase["lost"] == 0 and phase["gaps"] == 0, output
            assert phase["disconnected"] == 0, output
        rate = case["rate"]
        if reader == "node":
            # The reader's own CPU, apart from the machine's rest; what else it read, by type.
            # Measured, which is all that can be asked: twenty readers of twenty messages may
            # use less than the one clock tick (10 ms) that process CPU times count in.
            assert isinstance(rate["reader_cpu"], float) and rate["reader_cpu"] >= 0, output
            assert isinstance(rate["other_frames"], dict), output
        else:
            assert rate["reader_cpu"] is None, output
        if not stamp:
            assert rate["arrival_p99_ms"] is None, output
            continue
        # The kernel received each delivery after it was sent and before it was read.
        assert 0 < rate["arrival_p50_ms"] <= rate["arrival_p99_ms"] <= rate["arrival_max_ms"]
        assert rate["arrival_p50_ms"] <= rate["p50_ms"], output
        assert rate["arrival_p99_ms"] <= rate["p99_ms"], output
        assert rate["arrival_max_ms"] <= rate["max_ms"], output
