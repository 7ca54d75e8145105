"""Collab: settings, the app factory and the CLI; the only package that knows all the others.

`create_app` and `Settings` are imported on first use, not with the package: every `collab`
command (`worker`, `migrate`, `storage check`) runs `collab.cli`, and importing the web app
with it (FastAPI, the routers, the hub) cost a worker about 1.5 s more to start, which is
time a restarted worker leaves its queue unserved.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collab.app import create_app
    from collab.settings import Settings

__all__ = ["Settings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from collab.app import create_app

        return create_app
    if name == "Settings":
        from collab.settings import Settings

        return Settings
    raise AttributeError(f"module 'collab' has no attribute {name!r}")
