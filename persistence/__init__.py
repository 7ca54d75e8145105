"""Durable storage: SQLAlchemy models, repositories, migrations, and the storage side of the
realtime core (history reader, room access, message sinks)."""

from persistence.database import SessionFactory, create_engine, create_session_factory
from persistence.history import DatabaseHistory, DatabaseRoomAccess

__all__ = [
    "DatabaseHistory",
    "DatabaseRoomAccess",
    "SessionFactory",
    "create_engine",
    "create_session_factory",
]
