"""Finding the real services tests need, and refusing to skip them in CI.

On a developer's laptop a missing Redis or PostgreSQL skips the tests that need it. Under
`CI=true` it fails them: a skip in CI would hide a whole backend going untested.
"""

from __future__ import annotations

import os
import socket
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Under pytest-xdist (`-n auto`), each worker process of the run: "gw0", "gw1", ...
WORKER_INDEX = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
MAX_WORKERS = 3  # what the Redis databases below leave room for
if WORKER_INDEX >= MAX_WORKERS:
    raise pytest.UsageError(f"at most -n {MAX_WORKERS}: the test Redis has databases for that many")


def redis_db_url(db: int) -> str:
    """The test Redis (COLLAB_TEST_REDIS_URL's host) at database `db`: 15 for the unit tests, 14
    for the cluster tests, 13 for Celery queues and the security and NGINX tests, 12 for the
    fuzzers. Each is flushed by the tests that use it, so every xdist worker has its own: the
    numbers move down by 4 per worker (gw1 uses 11 to 8, gw2 7 to 4)."""
    base = urlsplit(os.environ.get("COLLAB_TEST_REDIS_URL", "redis://127.0.0.1:6379/15"))
    return urlunsplit((base.scheme, base.netloc, f"/{db - 4 * WORKER_INDEX}", "", ""))


REDIS_URL = redis_db_url(15)
POSTGRES_URL = os.environ.get(
    "COLLAB_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
MYSQL_URL = os.environ.get("COLLAB_TEST_MYSQL_URL", "mysql+aiomysql://root@127.0.0.1:3306/mysql")
RABBITMQ_URL = os.environ.get("COLLAB_TEST_RABBITMQ_URL", "amqp://guest:guest@127.0.0.1:5672//")


def reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection(
            (parts.hostname or "127.0.0.1", parts.port or default_port), 1
        ):
            return True
    except OSError:
        return False


def require(url: str, default_port: int, what: str) -> None:
    """Skip (laptop) or fail (CI) when a service is not listening."""
    if reachable(url, default_port):
        return
    message = f"{what} is not reachable at {url}"
    if IN_CI:
        pytest.fail(f"{message}; CI must provide it (.ci/run starts it)")
    pytest.skip(message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def mysql_connect(url: str) -> Any:
    """An autocommit aiomysql connection to the database of a SQLAlchemy `mysql+...` URL (the
    server's own `mysql` database when it names none); close it."""
    import aiomysql
    from sqlalchemy.engine import make_url

    parts = make_url(url)
    return await aiomysql.connect(
        host=parts.host or "127.0.0.1",
        port=parts.port or 3306,
        user=parts.username or "root",
        password=parts.password or "",
        db=parts.database or "mysql",
        autocommit=True,
    )
