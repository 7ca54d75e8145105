"""The JavaScript tooling of the suite: node and `clients/js`'s locked npm packages."""

from __future__ import annotations

import fcntl
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.services import IN_CI

JS = Path(__file__).resolve().parent.parent / "clients" / "js"


def require_js_tools() -> str:
    """node's path, with `clients/js/node_modules` installed from the lockfile (`npm ci`, once,
    and again whenever the lockfile is newer than the installation).

    Skips on a laptop without node or npm; fails in CI, which must have them.
    """
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if IN_CI:
            pytest.fail("node and npm are needed for the JavaScript client's tests")
        pytest.skip("node or npm is not installed")
    installed = JS / "node_modules" / ".package-lock.json"  # npm writes it on install
    lockfile = JS / "package-lock.json"
    # One installer at a time: the suite's xdist workers share the folder, and two `npm ci`
    # at once delete each other's files.
    with (JS / ".npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Missing, or older than the lockfile (a dependency changed since): install afresh.
        if not installed.exists() or installed.stat().st_mtime < lockfile.stat().st_mtime:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund"],
                cwd=JS,
                capture_output=True,
                text=True,
                timeout=300,
                check=False,
            )
            if done.returncode != 0:
                pytest.fail(f"npm ci failed in clients/js:\n{done.stdout}\n{done.stderr}")
    return node
