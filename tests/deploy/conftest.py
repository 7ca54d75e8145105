from __future__ import annotations

import pytest

from tests.deploy.tools import build_image


@pytest.fixture(scope="session")
def collab_image() -> str:
    """The image, built once per test session (podman's layer cache makes a rebuild of
    unchanged dependencies quick)."""
    return build_image()
