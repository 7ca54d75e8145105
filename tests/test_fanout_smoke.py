"""A tiny run of the fan-out benchmark (`python -m loadtests.fanout`): every message reaches
every subscriber, in order, against Collab and the plain `websockets` reference peer.

Behaviour only: the figures themselves (deliveries per second, latency, memory) are never
asserted here; they belong to docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stamp", [False, True], ids=["read", "stamped"])
def test_small_fanout_run_loses_no_message(tmp_path: Path, stamp: bool) -> None:
    """`--stamp` reads the subscribers with recvmsg (`loadtests.rawws.StampedTransport`) and
    adds the latency to the kernel's receive time of each delivery."""
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
            *(["--stamp"] if stamp else []),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, output
    cases = json.loads(out.read_text())["cases"]
    assert {case["target"] for case in cases} == {"collab", "websockets"}, output
    for case in cases:
        assert case["error"] is None, output
        assert case["joined"] == 20 and case["failures"] == {}, output
        for phase in (case["burst"], case["rate"]):
            assert phase["published"] > 0, output
            assert phase["acked"] == phase["published"], output
            assert phase["deliveries"] == phase["expected"] == phase["published"] * 20, output
            assert phase["lost"] == 0 and phase["gaps"] == 0, output
            assert phase["disconnected"] == 0, output
        rate = case["rate"]
        if not stamp:
            assert rate["arrival_p99_ms"] is None, output
            continue
        # The kernel received each delivery after it was sent and before it was read.
        assert 0 < rate["arrival_p50_ms"] <= rate["arrival_p99_ms"] <= rate["arrival_max_ms"]
        assert rate["arrival_p50_ms"] <= rate["p50_ms"], output
        assert rate["arrival_p99_ms"] <= rate["p99_ms"], output
        assert rate["arrival_max_ms"] <= rate["max_ms"], output
