from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.deploy.tools import build_image, podman


@pytest.fixture(scope="session")
def collab_image() -> Iterator[str]:
    """The image, built once per test session (podman's layer cache makes a rebuild of
    unchanged dependencies quick). A tag of this session's own, so that sessions in other
    worktrees building at the same time never swap images under each other; untagged at the
    end (the layers stay cached)."""
    tag = build_image(f"localhost/collab:test-{os.getpid()}")
    try:
        yield tag
    finally:
        podman("rmi", tag, check=False)
