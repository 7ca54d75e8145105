"""The embedded-mode message sink: batches written by this process, acknowledged on commit.

Publishers wait for their batch's commit, so an acknowledged message is in the database. A
batch collects for at most `max_delay` seconds or `max_batch` messages, whichever comes
first, so a burst costs one transaction, not one per message. The insert skips message ids
already stored, which makes a retried publish harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sqlalchemy.exc import SQLAlchemyError

from persistence.database import SessionFactory
from persistence.history import to_row
from persistence.repositories import MessageRepository
from realtime.storage import MessageSink, SinkUnavailable, StoredMessage
from realtime.types import UserInfo

log = logging.getLogger("collab.persistence")


class DatabaseSink(MessageSink):
    def __init__(
        self, sessions: SessionFactory, *, max_batch: int = 500, max_delay: float = 0.005
    ) -> None:
        self.sessions = sessions
        self.max_batch = max_batch
        self.max_delay = max_delay
        self._queue: asyncio.Queue[tuple[StoredMessage, asyncio.Future[None]]] | None = None
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        self.stored = 0

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
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._queue.put((message, done))
        await done

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
            async with self.sessions() as session:
                await MessageRepository(session).insert_many([to_row(m) for m, _ in batch])
                await session.commit()
        except (SQLAlchemyError, OSError) as exc:
            log.warning("could not store %d messages: %s", len(batch), exc)
            self.healthy = False
            for _, future in batch:
                if not future.done():
                    future.set_exception(SinkUnavailable("database unavailable"))
            return
        self.healthy = True
        self.batches += 1
        self.stored += len(batch)
        for _, future in batch:
            if not future.done():
                future.set_result(None)


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
