"""Logs the garbage collector's pauses of a process started with this folder on PYTHONPATH.

`python -m loadtests.fanout compare --gc-log DIR` starts the servers under test this way:
each collection of generation 2, and any other longer than a millisecond, becomes a line
`<monotonic time> <generation> <milliseconds> <objects in generation 2 after it>` in
DIR/gc-<pid>.log, so that the benchmark can say which pauses fell into its rate phase.
Python imports `sitecustomize` at start-up by itself; nothing to call.
"""

from __future__ import annotations

import gc
import os
import time
from typing import Any

_DIR = os.environ.get("FANOUT_GC_LOG")
_started = 0.0


def _timed(phase: str, info: dict[str, Any]) -> None:
    global _started
    if phase == "start":
        _started = time.perf_counter()
        return
    took = (time.perf_counter() - _started) * 1000
    generation = info["generation"]
    if generation == 2 or took > 1.0:
        # gc.get_count() is cheap; the size of generation 2 needs a walk, so only after a
        # full pass (which has just walked it anyway).
        size = len(gc.get_objects(2)) if generation == 2 else -1
        _log.write(f"{time.monotonic():.4f} {generation} {took:.2f} {size}\n")


if _DIR:
    _log = open(os.path.join(_DIR, f"gc-{os.getpid()}.log"), "a", buffering=1)  # noqa: SIM115
    gc.callbacks.append(_timed)
