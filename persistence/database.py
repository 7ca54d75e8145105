"""Engine and session factory. Built by the app's lifespan or a worker process, never at import."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import event, exc, make_url
from sqlalchemy.engine import Connection
from sqlalchemy.engine.interfaces import DBAPIConnection, DBAPICursor, ExecutionContext
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.util import await_only
from sqlalchemy.util.concurrency import in_greenlet

SessionFactory = async_sessionmaker[AsyncSession]

# How long a request waits for the database by default (its turn to write on SQLite, a
# pooled connection on any database) before it is told to come back later.
DEFAULT_BUSY_TIMEOUT = 10.0


class DatabaseBusy(exc.SQLAlchemyError):
    """The database did not take this work in time: overload, not a fault; retry later."""


# SQLite's own words for "another connection holds the lock" (SQLITE_BUSY, SQLITE_LOCKED).
_SQLITE_BUSY = re.compile(r"database (table )?is locked|database is busy", re.IGNORECASE)
# PostgreSQL and MySQL/MariaDB: serialization failure, deadlock, lock not available.
_BUSY_SQLSTATES = frozenset({"40001", "40P01", "55P03"})
_BUSY_MYSQL_CODES = frozenset({1205, 1213})


def is_busy(error: BaseException) -> bool:
    """True when `error` says the database is overloaded or contended, not broken: a later
    retry of the same work can succeed, so callers answer 503 with Retry-After."""
    if isinstance(error, DatabaseBusy | exc.TimeoutError):  # TimeoutError: the pool's wait
        return True
    if not isinstance(error, exc.DBAPIError):
        return False
    orig = error.orig
    for name in ("sqlstate", "pgcode"):
        if getattr(orig, name, None) in _BUSY_SQLSTATES:
            return True
    args = getattr(orig, "args", ())
    if args and isinstance(args[0], int) and args[0] in _BUSY_MYSQL_CODES:
        return True
    return isinstance(error, exc.OperationalError) and bool(_SQLITE_BUSY.search(str(orig)))


class SQLiteWriter:
    """One write transaction at a time in this process, in arrival order.

    SQLite has one write lock per database. Under pysqlite's default transaction handling a
    transaction takes it at its first INSERT, UPDATE or DELETE and keeps it until COMMIT or
    ROLLBACK; meanwhile other connections that want it poll (busy_timeout) with growing
    sleeps, in no order. Under a crowd the holder's COMMIT waits its turn on a busy event
    loop, the pollers sleep past the moments the lock is free, and an unlucky one polls for
    the whole busy_timeout and fails with "database is locked": a 500 on a guest sign-in.

    Here a connection instead waits for an `asyncio.Lock` (fair: first come, first served,
    and no sleeping past a free lock) before its first write statement, and gives it back
    when its transaction ends. Reads take nothing: outside a write transaction they run in
    autocommit, and WAL lets them run beside the writer. SQLite then meets at most one
    writer from this process, so busy_timeout is left for other processes (`collab migrate`,
    `collab storage check --repair`). A write that waits longer than `timeout` raises
    `DatabaseBusy` (answered 503 with Retry-After).

    The hooks run inside SQLAlchemy's greenlet bridge, so they may await (`await_only`), as
    the aiosqlite adapter itself does for every statement.
    """

    _WRITES = ("INSERT", "UPDATE", "DELETE", "REPLAC")

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._lock: asyncio.Lock | None = None
        self._holder: object | None = None
        self.waits = 0  # write transactions that found the lock taken
        self.timeouts = 0  # ...and gave up after `timeout`

    def install(self, engine: AsyncEngine) -> None:
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "before_cursor_execute", self._before_execute)
        dialect = sync_engine.dialect
        # The dialect instance belongs to this engine alone; its transaction ends are where
        # the lock goes back (a pool's reset-on-return is a do_rollback too).
        for name in ("do_commit", "do_rollback", "do_close", "do_terminate"):
            setattr(dialect, name, self._releasing(getattr(dialect, name)))

    def _before_execute(
        self,
        conn: Connection,
        _cursor: DBAPICursor,
        statement: str,
        _parameters: Any,
        _context: ExecutionContext | None,
        _executemany: bool,
    ) -> None:
        dbapi_connection = conn.connection.dbapi_connection
        if self._holder is dbapi_connection or not in_greenlet():
            return
        if statement.lstrip()[:6].upper() not in self._WRITES:
            return
        if self._lock is None:  # made in the running event loop, which it belongs to
            self._lock = asyncio.Lock()
        if self._lock.locked():
            self.waits += 1
        try:
            await_only(self._acquire(self._lock))
        except TimeoutError:
            self.timeouts += 1
            raise DatabaseBusy(
                f"no turn to write within {self.timeout:g} s; the database is busy"
            ) from None
        self._holder = dbapi_connection

    async def _acquire(self, lock: asyncio.Lock) -> None:
        # asyncio.timeout, not wait_for: on 3.11 wait_for can time out a lock it has just
        # acquired, and the lock would never be given back.
        async with asyncio.timeout(self.timeout):
            await lock.acquire()

    def _releasing(
        self, original: Callable[[DBAPIConnection], None]
    ) -> Callable[[DBAPIConnection], None]:
        def release_after(dbapi_connection: DBAPIConnection) -> None:
            # SQLAlchemy hands these the pool's proxy of the connection; compare the driver's.
            driver = getattr(dbapi_connection, "dbapi_connection", dbapi_connection)
            try:
                original(dbapi_connection)
            finally:
                if self._holder is not None and self._holder is driver:
                    self._holder = None
                    assert self._lock is not None
                    self._lock.release()

        return release_after


def _sqlite_pragmas(busy_timeout: float) -> Callable[[DBAPIConnection, ConnectionPoolEntry], None]:
    def on_connect(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # WAL lets readers run while the writer commits; foreign keys are off by default in
        # SQLite; busy_timeout turns another process's write lock into a wait.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cursor.close()

    return on_connect


def _sqlite_in_memory(url: str) -> bool:
    parsed = make_url(url)
    return parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory"


def create_engine(
    url: str, *, busy_timeout: float = DEFAULT_BUSY_TIMEOUT, **kwargs: Any
) -> AsyncEngine:
    """An async engine with the settings each backend needs.

    `busy_timeout` bounds each wait for the database (a pooled connection; on SQLite also the
    turn to write); past it the work fails with an error `is_busy` recognises.
    """
    if busy_timeout <= 0:
        raise ValueError(f"busy_timeout must be positive, not {busy_timeout!r}")
    if url.startswith("sqlite"):
        if not _sqlite_in_memory(url) and "poolclass" not in kwargs:
            kwargs.setdefault("pool_timeout", busy_timeout)  # (in memory: one static connection)
        engine = create_async_engine(url, **kwargs)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas(busy_timeout))
        SQLiteWriter(busy_timeout).install(engine)
        return engine
    if "poolclass" not in kwargs:
        kwargs.setdefault("pool_timeout", busy_timeout)
    kwargs.setdefault("pool_pre_ping", True)
    kwargs.setdefault("pool_size", 10)
    kwargs.setdefault("max_overflow", 10)
    return create_async_engine(url, **kwargs)


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    # expire_on_commit=False: objects stay readable after commit, so a router can return what
    # it just wrote without another round trip (and without lazy loads in async code).
    return async_sessionmaker(engine, expire_on_commit=False)
