"""The production message sink: batches handed to a Celery broker, stored by `collab worker`.

`store` returns once the message's batch is in the broker: for RabbitMQ, confirmed by the
broker (publisher confirms); for Redis, the LPUSH has answered. An acknowledged message is
therefore either in the broker's queue or already stored, and the worker's insert skips
message ids it already has, so a batch delivered twice writes nothing twice.

Celery's client blocks and is not thread-safe, and the event loop must never wait on the
broker. So one dedicated thread owns the Celery app and sends every batch; the event loop
only appends to a batch and, once per batch, hands it to that thread. Batches close after
`max_batch` messages or `max_delay` seconds, whichever comes first; while the thread is busy
sending, batches that wait behind it are merged (up to `max_batch`), so a slow broker gets
fewer, larger tasks rather than a growing backlog of small ones.

This module knows the task only by name and payload; `workers` implements it. Celery itself
is never imported here: the app object is handed in by whoever builds the sink.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from realtime.stats import Stat
from realtime.storage import MessageSink, SinkUnavailable, StoredMessage

log = logging.getLogger("collab.persistence")

# The contract between this sink and the worker: a task of this name whose one argument is a
# list of `encode_message` objects (JSON, never pickle).
STORE_BATCH_TASK = "collab.store_messages"


def encode_message(message: StoredMessage) -> dict[str, Any]:
    """A message as a JSON object: the fields of the `message` event, without its type."""
    event = message.event()
    del event["type"]
    return event


def decode_message(data: Mapping[str, Any]) -> StoredMessage:
    """The inverse of `encode_message`; raises KeyError, TypeError or ValueError on bad data."""
    client_msg_id = data.get("client_msg_id")
    if client_msg_id is not None and not isinstance(client_msg_id, str):
        raise TypeError("client_msg_id must be a string or null")
    return StoredMessage.from_event(dict(data))


@dataclass(eq=False)
class _Batch:
    messages: list[StoredMessage] = field(default_factory=list)
    futures: list[asyncio.Future[None]] = field(default_factory=list)
    expiry: asyncio.TimerHandle | None = None


_STOP = _Batch()  # in the outbox: send what came before, then end the thread


class CeleryMessageSink(MessageSink):
    """Batches messages and sends one Celery task per batch from a single sender thread.

    `celery_app` is a configured `celery.Celery` (see `workers.app.create_celery_app`); only
    the sender thread ever touches it. `send_timeout` bounds how long `store` waits for the
    broker: past it the caller gets SinkUnavailable, even if the batch is sent later (the
    publisher's retry is then stored once, because its message id is the same).
    """

    def __init__(
        self,
        celery_app: Any,
        *,
        queue_name: str,
        max_batch: int = 500,
        max_delay: float = 0.005,
        send_timeout: float = 5.0,
        task_name: str = STORE_BATCH_TASK,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.app = celery_app
        self.queue_name = queue_name
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.send_timeout = send_timeout
        self.task_name = task_name
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending = _Batch()
        self._flush_timer: asyncio.TimerHandle | None = None
        self._outbox: queue.SimpleQueue[_Batch] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._producer: Any = None  # the sender thread's own
        self._sending = False  # the sender thread runs (cheaper to read than is_alive())
        self._closing = False
        # Read by metrics and tests; written by the sender thread only.
        self.tasks_sent = 0
        self.messages_sent = 0
        self.send_failures = 0
        self.healthy = True

    def stats(self) -> list[Stat]:
        return [
            Stat(
                "sink_messages_sent",
                "Messages handed to the Celery broker by this node",
                self.messages_sent,
            ),
            Stat(
                "sink_send_failures", "Batches the Celery broker did not take", self.send_failures
            ),
        ]

    # -- the event loop's side -----------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._closing = False
        self._sending = True
        self._thread = threading.Thread(target=self._run, name="collab-celery-sender", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        """Send what is pending, then stop the sender thread."""
        if self._thread is None or self._loop is None:
            return
        self._closing = True
        self._flush()
        self._outbox.put(_STOP)
        thread, self._thread = self._thread, None
        await self._loop.run_in_executor(None, thread.join, self.send_timeout + 5.0)
        if thread.is_alive():
            log.warning("the Celery sender thread did not stop within %.0fs", self.send_timeout)
        # Anything still waiting will not be sent by this sink any more.
        while True:
            try:
                batch = self._outbox.get_nowait()
            except queue.Empty:
                break
            self._settle([batch], "message store is shutting down")

    async def store(self, message: StoredMessage) -> None:
        loop = self._loop
        if loop is None or self._closing or not self._sending:
            raise SinkUnavailable("message store is not running")
        future: asyncio.Future[None] = loop.create_future()
        pending = self._pending
        pending.messages.append(message)
        pending.futures.append(future)
        if len(pending.messages) >= self.max_batch:
            self._flush()
        elif self._flush_timer is None:
            self._flush_timer = loop.call_later(self.max_delay, self._flush)
        await future

    def _flush(self) -> None:
        """Hand the pending batch to the sender thread (on the event loop, never blocking)."""
        if self._flush_timer is not None:
            self._flush_timer.cancel()
            self._flush_timer = None
        batch, self._pending = self._pending, _Batch()
        if not batch.messages:
            return
        assert self._loop is not None
        batch.expiry = self._loop.call_later(self.send_timeout, self._expire, batch)
        self._outbox.put(batch)

    @staticmethod
    def _expire(batch: _Batch) -> None:
        for future in batch.futures:
            if not future.done():
                future.set_exception(SinkUnavailable("the Celery broker did not take the batch"))

    @staticmethod
    def _settle(batches: Iterable[_Batch], error: str | None) -> None:
        """Resolve the batches' `store` calls: acknowledged, or SinkUnavailable(error)."""
        for batch in batches:
            if batch.expiry is not None:
                batch.expiry.cancel()
            for future in batch.futures:
                if future.done():  # expired, or its publisher went away
                    continue
                if error is None:
                    future.set_result(None)
                else:  # one exception each: a shared one would collect every traceback
                    future.set_exception(SinkUnavailable(error))

    # -- the sender thread ---------------------------------------------------------------------

    def _run(self) -> None:
        # The thread's own connection and producer: not the app's process-wide pools, which
        # another sink in this process could be using.
        try:
            connection = self.app.connection_for_write()
            self._producer = self.app.amqp.Producer(connection, auto_declare=False)
            try:
                self._warm_up(connection)
                self._loop_until_stopped()
            finally:
                with contextlib.suppress(Exception):
                    connection.close()
        except Exception:  # waiting batches expire into `unavailable`; new ones are refused
            log.exception("the Celery sender thread failed; messages cannot be stored")
        finally:
            self._sending = False

    def _loop_until_stopped(self) -> None:
        carry: _Batch | None = None
        stopping = False
        while not stopping or carry is not None:
            batches = [carry] if carry is not None else [self._outbox.get()]
            carry = None
            if batches[0] is _STOP:
                stopping = True
                batches = []
            # Batches that queued up while the last send was in flight go out together.
            size = sum(len(b.messages) for b in batches)
            while not stopping:
                try:
                    waiting = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if waiting is _STOP:
                    stopping = True
                elif size + len(waiting.messages) > self.max_batch:
                    carry = waiting
                    break
                else:
                    batches.append(waiting)
                    size += len(waiting.messages)
            if stopping and carry is None:
                batches.extend(self._drain())
            if batches:
                self._send_all(batches)

    def _drain(self) -> list[_Batch]:
        rest: list[_Batch] = []
        while True:
            try:
                waiting = self._outbox.get_nowait()
            except queue.Empty:
                return rest
            if waiting is not _STOP:
                rest.append(waiting)

    def _send_all(self, batches: list[_Batch]) -> None:
        # After a stop, drained batches may exceed max_batch together: send them in slices.
        group: list[_Batch] = []
        size = 0
        for batch in batches:
            if group and size + len(batch.messages) > self.max_batch:
                self._send(group)
                group, size = [], 0
            group.append(batch)
            size += len(batch.messages)
        if group:
            self._send(group)

    def _send(self, batches: list[_Batch]) -> None:
        count = sum(len(batch.messages) for batch in batches)
        error: str | None = None
        started = time.perf_counter()
        try:
            payload = [encode_message(m) for batch in batches for m in batch.messages]
            self.app.send_task(
                self.task_name,
                args=[payload],
                queue=self.queue_name,
                producer=self._producer,
                retry=True,
                retry_policy={
                    "max_retries": 2,
                    "interval_start": 0,
                    "interval_step": 0.2,
                    "interval_max": 0.5,
                },
                timeout=self.send_timeout,
                confirm_timeout=self.send_timeout,
            )
        except Exception as exc:  # any failure to hand over means: not acknowledged
            self.send_failures += 1
            if self.healthy:
                log.warning("could not send %d messages to the Celery broker: %r", count, exc)
            self.healthy = False
            error = "the Celery broker is unavailable"
        else:
            self.tasks_sent += 1
            self.messages_sent += count
            if not self.healthy:
                log.info("the Celery broker takes batches again")
            self.healthy = True
            elapsed = time.perf_counter() - started
            if elapsed > 1.0:
                log.warning("sending %d messages took %.1fs", count, elapsed)
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody is waiting
            loop.call_soon_threadsafe(self._settle, batches, error)

    def _warm_up(self, connection: Any) -> None:
        """Connect before the first message, so its ack does not pay for it; not fatal."""
        try:
            connection.ensure_connection(max_retries=1, timeout=self.send_timeout)
        except Exception as exc:
            log.warning("the Celery broker is not reachable yet: %r", exc)
