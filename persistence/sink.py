"""The embedded-mode message sink: batches written by this process, acknowledged on commit.

Publishers wait for their batch's commit, so an acknowledged message is in the database. A
batch collects for at most `max_delay` seconds or `max_batch` messages, whichever comes
first, so a burst costs one transaction, not one per message. The insert skips message ids
already stored, which makes a retried publish harmless, and a row the database refuses is set
aside without failing the rest of its batch (`persistence.writer`).

Nothing here grows without bound: at most `max_pending` messages wait for a write, and a
publisher waits at most `timeout` seconds. Past either, `store` answers `SinkUnavailable`; the
message was already delivered, so the reconciler stores it from the broker's window once the
database takes writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.exc import SQLAlchemyError

from persistence.database import SessionFactory
from persistence.history import to_row
from persistence.writer import reason_of, write_messages
from realtime.stats import Stat, gauge
from realtime.storage import MessageRefused, MessageSink, SinkUnavailable, StoredMessage
from realtime.types import UserInfo

log = logging.getLogger("collab.persistence")


class DatabaseSink(MessageSink):
    def __init__(
        self,
        sessions: SessionFactory,
        *,
        max_batch: int = 500,
        max_delay: float = 0.005,
        max_pending: int = 10_000,
        timeout: float = 10.0,
    ) -> None:
        self.sessions = sessions
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.max_pending = max_pending
        self.timeout = timeout
        self._queue: asyncio.Queue[tuple[StoredMessage, asyncio.Future[None]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.stored = 0
        self.set_aside = 0
        self.refused_busy = 0  # store calls answered at once: `max_pending` already waiting

    def stats(self) -> list[Stat]:
        return [
            Stat("sink_stored", "Messages written by this node's in-process sink", self.stored),
            Stat(
                "sink_set_aside",
                "Messages the database refused in this node's in-process sink",
                self.set_aside,
            ),
            Stat(
                "sink_refused_busy",
                "Publishes the in-process sink turned away: too many waiting",
                self.refused_busy,
            ),
            gauge("sink_pending", "Messages waiting for the in-process sink's write", self.pending),
        ]

    @property
    def pending(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is None or self._queue is None:
            return
        # Let what is queued be written, then stop.
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((_STOP, done))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(self._task), 10.0)
        if not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._task = None

    async def store(self, message: StoredMessage) -> None:
        if self._queue is None or self._task is None or self._task.done():
            raise SinkUnavailable("message store is not running")
        if self._queue.qsize() >= self.max_pending:
            self.refused_busy += 1
            raise SinkUnavailable("message store is backed up")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((message, done))
        try:
            await asyncio.wait_for(asyncio.shield(done), self.timeout)
        except TimeoutError:
            raise SinkUnavailable("message store did not answer in time") from None

    async def _run(self) -> None:
        assert self._queue is not None
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.max_delay
            while len(batch) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), timeout))
                except TimeoutError:
                    break
            stopping = any(message is _STOP for message, _ in batch)
            messages = [(m, f) for m, f in batch if m is not _STOP]
            await self._write(messages)
            if stopping:
                for message, future in batch:
                    if message is _STOP and not future.done():
                        future.set_result(None)
                # Drain anything queued behind the stop marker as well.
                rest = []
                while not queue.empty():
                    rest.append(queue.get_nowait())
                await self._write([(m, f) for m, f in rest if m is not _STOP])
                return

    async def _write(self, batch: list[tuple[StoredMessage, asyncio.Future[None]]]) -> None:
        if not batch:
            return
        try:
            outcome = await write_messages(self.sessions, [to_row(m) for m, _ in batch])
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not store %d messages: %s", len(batch), reason_of(exc))
            self.healthy = False
            for _, future in batch:
                if not future.done():
                    future.set_exception(SinkUnavailable("database unavailable"))
            return
        self.healthy = True
        self.batches += 1
        refused = {row["msg_id"]: reason for row, reason in outcome.set_aside}
        self.set_aside += len(refused)
        self.stored += len(batch) - len(refused)
        for message, future in batch:
            if future.done():
                continue
            reason = refused.get(message.msg_id)
            if reason is None:
                future.set_result(None)
            else:
                future.set_exception(MessageRefused(reason))


# A marker in the queue: write what came before it, then stop.
_STOP = StoredMessage(
    msg_id="",
    room="",
    epoch="",
    offset=0,
    user=UserInfo("", ""),
    body={},
    client_msg_id=None,
    ts="",
)
