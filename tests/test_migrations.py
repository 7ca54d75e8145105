"""Migrations match the models and run both ways, on every supported database."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from persistence import migrate
from persistence.database import create_engine
from persistence.models import Base


def _differences(url: str) -> list[Any]:
    async def run() -> list[Any]:
        engine = create_engine(url)
        try:
            async with engine.connect() as connection:

                def compare(sync: Connection) -> list[Any]:
                    context = MigrationContext.configure(sync, opts={"compare_type": True})
                    return list(compare_metadata(context, Base.metadata))

                return await connection.run_sync(compare)
        finally:
            await engine.dispose()

    return asyncio.run(run())


@pytest.mark.slow
def test_migrations_match_models_and_downgrade_cleanly(database_url: str) -> None:
    assert _differences(database_url) == []
    migrate.downgrade(database_url, "base")
    migrate.upgrade(database_url)
    assert _differences(database_url) == []
