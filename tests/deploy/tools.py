"""Podman and the other programs the deployment tests run for real.

On a laptop without them the tests skip; under `CI=true` a missing program fails them, since
a skip there would hide the whole deployment going untested (.ci/run installs them).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.services import IN_CI

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
BASE_IMAGE = "localhost/collab-base:bookworm"
# What this machine's podman needs (issue 11): crun refuses its hybrid cgroups, and the default
# ulimits cannot be raised here.
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
ULIMITS = ["--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096"]


def require_program(name: str, package: str | None = None) -> str:
    """The program's path; skip (laptop) or fail (CI) when it is not installed."""
    found = shutil.which(name) or next(
        (str(p) for p in (Path("/usr/sbin") / name, Path("/sbin") / name) if p.exists()), None
    )
    if found is None:
        message = f"{name} is not installed ({package or name})"
        if IN_CI:
            pytest.fail(f"{message}; .ci/run installs it")
        pytest.skip(message)
    return found


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def build_image(tag: str) -> str:
    """Build deploy/Dockerfile from the local base (made first if this machine has none)."""
    require_program("podman")
    require_program("runc")
    if podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        require_program("debootstrap")
        subprocess.run([str(DEPLOY / "base-image.sh"), BASE_IMAGE], check=True, timeout=600)
    podman(
        "build", "--format", "docker", *ULIMITS, "--network", "host",
        # pip inside the build reaches the package index with the host's CA bundle.
        "--volume", "/etc/ssl/certs/ca-certificates.crt:/etc/ssl/certs/ca-certificates.crt:ro",
        "--build-arg", f"BASE_IMAGE={BASE_IMAGE}", "-f", str(DEPLOY / "Dockerfile"),
        "-t", tag, str(REPO),
        timeout=900,
    )  # fmt: skip
    return tag
