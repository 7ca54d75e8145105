"""The linters the project holds itself to, run by the test command.

`ruff` and `mypy` clean is a standard of the project (CONTRIBUTING.md), and the only way it
stays one is that the command everyone runs before a commit, and CI, fail when it is broken: a
type error in a benchmark or a REST router is a bug a user meets later. Each check runs the tool
on the whole tree with the project's own configuration (`pyproject.toml`), as a developer
would, and shows its output when it fails.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


@pytest.mark.parametrize(
    "command",
    [
        pytest.param(("ruff", "check", "--no-cache", "."), id="ruff-check"),
        pytest.param(("ruff", "format", "--check", "--no-cache", "."), id="ruff-format"),
    ],
)
def test_ruff_is_clean(command: tuple[str, ...]) -> None:
    done = _run(*command)
    assert done.returncode == 0, done.stdout + done.stderr


def test_mypy_is_clean(tmp_path: Path) -> None:
    """Strict mypy over every package `pyproject.toml` names, loadtests included."""
    done = _run("mypy", "--cache-dir", str(tmp_path / "mypy"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Success: no issues found" in done.stdout
