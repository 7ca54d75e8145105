"""Collab: settings, the app factory and the CLI; the only package that knows all the others."""

from collab.app import create_app
from collab.settings import Settings

__all__ = ["Settings", "create_app"]
