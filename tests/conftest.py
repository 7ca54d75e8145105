from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy.engine import make_url

from collab.app import create_app
from collab.settings import Settings
from persistence import migrate
from tests.redis_cluster import RedisClusterProcesses
from tests.services import MAX_WORKERS, MYSQL_URL, POSTGRES_URL, REDIS_URL, mysql_connect, require

pytest_plugins = ["tests.celery_brokers"]

# The files that take longest, started first so that no worker is left with one of them at
# the end while the others idle (seconds on a 2-core machine, with coverage, 2026-11-29).
LONGEST_FIRST = (
    "tests/test_storage_guarantee.py",  # 430: workers killed at every step, five times each
    "tests/deploy",  # 150: the image built and run, the compose stack behind NGINX
    "tests/test_celery_worker.py",  # 110
    "tests/test_chat_e2e.py",  # 100
    "tests/test_crowd_e2e.py",  # 50
)


def _group(nodeid: str) -> str:
    """A test file runs whole on one xdist worker (its module fixtures are set up once); the
    deployment tests share one image build, so they are one group."""
    path = nodeid.split("::", 1)[0]
    return "tests/deploy" if path.startswith("tests/deploy/") else path


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        group = _group(item.nodeid)
        return LONGEST_FIRST.index(group) if group in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order within a file, and of the rest, is kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """xdist's scheduling by scope, with `_group` as the scope: test ids stay as they are
    (xdist's `loadgroup` appends `@group` to every id, which then no longer selects a test)."""
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class ByGroup(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return _group(nodeid)

    return ByGroup(config, log)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one worker per core, at most MAX_WORKERS (the test Redis databases)."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """A real Redis, its test database emptied before and after the test."""
    require(REDIS_URL, 6379, "Redis")
    import redis.asyncio as redis

    client = redis.Redis.from_url(REDIS_URL)
    await client.flushdb()
    try:
        yield REDIS_URL
    finally:
        await client.flushdb()
        await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterProcesses]:
    """A Redis Cluster of the session's own (three masters, a replica each), stopped by PID
    at the end. Tests keep apart by their random channel names."""
    cluster = RedisClusterProcesses(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def redis_cluster_url(redis_cluster: RedisClusterProcesses) -> str:
    """The session's Redis Cluster, emptied for the test (as `redis_url` empties its db)."""
    redis_cluster.flush()
    return redis_cluster.url


# --- databases -------------------------------------------------------------------------------


TEST_SECRET = "test-secret-" + "x" * 40


def _pg_admin_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def _pg_execute(url: str, *statements: str) -> None:
    import asyncpg

    connection = await asyncpg.connect(_pg_admin_dsn(url))
    try:
        for statement in statements:
            await connection.execute(statement)
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One migrated SQLite file, copied for each test (migrating costs more than copying)."""
    path = tmp_path_factory.mktemp("sqlite") / "template.db"
    migrate.upgrade(f"sqlite+aiosqlite:///{path}")
    return path


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A PostgreSQL database of this test session's own, migrated once, dropped at the end."""
    require(POSTGRES_URL, 5432, "PostgreSQL")
    name = f"collab_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(_pg_execute(POSTGRES_URL, f'CREATE DATABASE "{name}"'))
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        asyncio.run(_pg_execute(POSTGRES_URL, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


TABLES = ("messages", "set_aside_messages", "room_members", "rooms", "items", "users")


async def _mysql_execute(url: str, *statements: str) -> None:
    connection = await mysql_connect(url)
    try:
        async with connection.cursor() as cursor:
            for statement in statements:
                await cursor.execute(statement)
    finally:
        connection.close()


@pytest.fixture(scope="session")
def mysql_database() -> Iterator[str]:
    """A MariaDB/MySQL database of this session's own, migrated once, dropped at the end."""
    require(MYSQL_URL, 3306, "MariaDB/MySQL")
    name = f"collab_test_{uuid.uuid4().hex[:10]}"
    asyncio.run(_mysql_execute(MYSQL_URL, f"CREATE DATABASE `{name}`"))
    url = make_url(MYSQL_URL).set(database=name).render_as_string(hide_password=False)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        asyncio.run(_mysql_execute(MYSQL_URL, f"DROP DATABASE IF EXISTS `{name}`"))


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", marks=pytest.mark.mysql),
    ]
)
def database_url(
    request: pytest.FixtureRequest, tmp_path: Path, sqlite_template: Path
) -> Iterator[str]:
    """Each test that uses it runs on SQLite, PostgreSQL and MariaDB, with empty tables."""
    if request.param == "sqlite":
        path = tmp_path / "collab.db"
        shutil.copy(sqlite_template, path)
        yield f"sqlite+aiosqlite:///{path}"
        return
    if request.param == "mysql":
        url = request.getfixturevalue("mysql_database")
        asyncio.run(
            _mysql_execute(
                url,
                "SET FOREIGN_KEY_CHECKS=0",
                *(f"TRUNCATE TABLE {table}" for table in TABLES),
                "SET FOREIGN_KEY_CHECKS=1",
            )
        )
        yield url
        return
    url = request.getfixturevalue("postgres_database")
    asyncio.run(_pg_execute(url, f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    yield url


def make_settings(database_url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "env": "test",
        "database_url": database_url,
        "secret_key": TEST_SECRET,
        "auto_migrate": False,
        "node_id": "test-node",
        "auth_rate_limit": 10_000,
        "auth_rate_burst": 10_000,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def settings(database_url: str) -> Settings:
    return make_settings(database_url)


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """The app in-process, its lifespan run, reached through httpx."""
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as http:
            yield http


@pytest.fixture(autouse=True)
async def _close_websocket_clients() -> AsyncIterator[None]:
    """Close the WebSocket clients a test opened, even when it failed half-way."""
    yield
    from tests.wsclient import Client

    await Client.close_all()
