"""The batch task: store a batch of accepted messages exactly once, however often it arrives.

Exactly once is the product of three things. The broker keeps a batch until a worker
acknowledges it, and the worker acknowledges only after the commit (`acks_late`; a worker
process that dies mid-batch gives it back, `reject_on_worker_lost`; a whole worker that dies
leaves it unacknowledged, and the broker hands it out again). The insert skips message ids
already stored (`ON CONFLICT DO NOTHING` on `msg_id`), so a batch delivered twice writes
nothing twice. And while the database cannot be reached, the batch is retried with
exponential backoff, without limit: it waits, it is not dropped.

The database engine belongs to the process that runs the task. Celery's prefork pool forks
its children from the main process; an engine made before the fork would share its sockets
with the parent. So each process makes its own (on `worker_process_init`, or on first use
for the solo and threads pools), with its own event loop for the async driver.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from persistence.celery_sink import STORE_BATCH_TASK, decode_message
from persistence.database import SessionFactory, create_engine, create_session_factory
from persistence.history import to_row
from persistence.writer import reason_of, write_messages
from workers.metrics import metrics

if TYPE_CHECKING:
    from collab.settings import Settings

log = logging.getLogger("collab.workers")


class BatchNotStored(Exception):
    """The batch could not be written now (the database is unreachable, or something
    unexpected failed); the task retries it later rather than dropping it."""


class BatchWriter:
    """This process's engine and event loop, made in the process that uses them."""

    def __init__(self, database_url: str) -> None:
        self.database_url = database_url
        self._pid: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._engine: AsyncEngine | None = None
        self._sessions: SessionFactory | None = None
        # The threads pool runs tasks concurrently; they share this process's loop in turn.
        self._lock = threading.Lock()

    def open(self) -> None:
        """Make this process's engine, unless it already has one."""
        if self._pid == os.getpid():
            return
        # Whatever a parent process made is dropped without closing: its connections are the
        # parent's, and closing them here would break them there.
        self._loop = asyncio.new_event_loop()
        kwargs: dict[str, Any] = {}
        if self.database_url.startswith("postgresql+asyncpg"):
            # One task at a time per process: a small pool, and no endless connect attempts.
            kwargs = {
                "pool_size": 2,
                "max_overflow": 0,
                "connect_args": {"timeout": 10, "command_timeout": 60},
            }
        self._engine = create_engine(self.database_url, **kwargs)
        self._sessions = create_session_factory(self._engine)
        self._pid = os.getpid()

    def close(self) -> None:
        if self._pid != os.getpid() or self._loop is None or self._engine is None:
            return
        with self._lock:
            try:
                self._loop.run_until_complete(self._engine.dispose())
            except Exception as exc:  # shutting down: nothing left to protect
                log.debug("closing the database engine: %r", exc)
            finally:
                self._loop.close()
                self._pid = self._loop = self._engine = self._sessions = None

    def write(self, rows: Sequence[dict[str, Any]]) -> int:
        """Insert the rows (skipping stored message ids); how many the database refused.

        Raises BatchNotStored when nothing could be committed for now.
        """
        with self._lock:
            self.open()
            assert self._loop is not None
            try:
                return self._loop.run_until_complete(self._write(rows))
            except (SQLAlchemyError, OSError, TimeoutError) as exc:
                raise BatchNotStored(f"database unavailable: {reason_of(exc)}") from exc

    async def _write(self, rows: Sequence[dict[str, Any]]) -> int:
        assert self._sessions is not None
        outcome = await write_messages(self._sessions, rows)
        return len(outcome.set_aside)


_writer: BatchWriter | None = None


def _open_writer(**_: object) -> None:
    if _writer is not None:
        _writer.open()


def _close_writer(**_: object) -> None:
    if _writer is not None:
        _writer.close()


def decode_batch(batch: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The batch's rows; a message that cannot be read is logged and left out, not retried."""
    rows: list[dict[str, Any]] = []
    for data in batch:
        try:
            row = to_row(decode_message(data))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            metrics().rejected.inc()
            log.error("a batch held a message that cannot be read, not stored: %r (%r)", data, exc)
            continue
        rows.append(row)
    return rows


def store_batch(writer: BatchWriter, batch: Sequence[Mapping[str, Any]]) -> int:
    """The task's work, apart from Celery: decode, write, record. How many were written."""
    rows = decode_batch(batch)
    if not rows:
        return 0
    try:
        rejected = writer.write(rows)
    except BatchNotStored:
        metrics().retries.inc()
        raise
    except Exception as exc:
        # A bug, most likely. Retrying keeps the batch (and logs each try) until it is fixed.
        metrics().retries.inc()
        log.exception("storing a batch of %d failed unexpectedly; it will be retried", len(batch))
        raise BatchNotStored(f"unexpected error: {exc!r}") from exc
    now = time.time()
    lags = [max(0.0, now - row["created_at"].timestamp()) for row in rows]
    metrics().batch_stored(len(rows), lags)
    if rejected:
        metrics().rejected.inc(rejected)
    return len(rows) - rejected


def register(app: Any, settings: Settings) -> Any:
    """Add the batch task to `app` and give each worker process its own database engine."""
    from celery import Task, signals
    from celery.exceptions import Reject

    global _writer
    _writer = BatchWriter(settings.database_url)
    signals.worker_process_init.connect(_open_writer, weak=False, dispatch_uid="collab-db-open")
    signals.worker_process_shutdown.connect(
        _close_writer, weak=False, dispatch_uid="collab-db-close"
    )
    signals.worker_shutdown.connect(_close_writer, weak=False, dispatch_uid="collab-db-close-main")

    class BatchTask(Task):  # type: ignore[misc]
        def retry(self, *args: Any, **kwargs: Any) -> Any:
            # Celery sends a retry as a new message and acknowledges the old one; when that
            # send fails, it rejects the old one *without* requeueing: the batch would be
            # lost. Put it back on the queue instead.
            try:
                return super().retry(*args, **kwargs)
            except Reject as exc:
                if exc.requeue:
                    raise
                log.warning("could not send the retry of %s; requeued", self.request.id)
                raise Reject(exc.reason, requeue=True) from exc

    writer = _writer

    @app.task(  # type: ignore[untyped-decorator]
        name=STORE_BATCH_TASK,
        base=BatchTask,
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        autoretry_for=(BatchNotStored,),
        retry_backoff=1,
        retry_backoff_max=settings.celery_retry_backoff_max,
        retry_jitter=True,
        max_retries=None,
    )
    def store_messages(self: Any, batch: list[dict[str, Any]]) -> int:
        return store_batch(writer, batch)

    return store_messages
