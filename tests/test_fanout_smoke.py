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


def test_small_fanout_run_loses_no_message(tmp_path: Path) -> None:
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
