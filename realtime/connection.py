"""One WebSocket: a bounded outgoing queue, a writer only when backed up, and a rate limit.

Delivery is the hot path of the whole server (one message to thousands of members), so it
costs as little as possible when nothing is backed up. Under uvicorn's websockets-sansio (what
`collab serve` runs) a member gets the message's prebuilt frame written to its transport at
once, or in a burst coalesced with the others of the same loop turn and written once the turn
is done (`realtime.transport`);
under any other ASGI server `deliver` writes into the socket's `send` directly, without a task,
future or copy per member. Only when the socket cannot take more (the peer reads slowly and
the transport paused writing) does the frame go to a queue bounded in bytes, drained by a
writer task that exists only while the backlog does. A peer that lets the queue overflow is
closed with 4408 and recovers when it reconnects; it never makes the node buffer without limit
and never delays other members.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from realtime.protocol import CLOSE_REASONS, CloseCode
from realtime.transport import DirectWriter, Outbox, Outgoing, direct_writer
from realtime.types import UserInfo

log = logging.getLogger("collab.realtime")

ASGISend = Callable[[dict[str, Any]], Awaitable[None]]

# Above this, a loop turn's frames for one connection are not joined into one write (see flush).
_COALESCED_WRITE_MAX = 64 * 1024


class TokenBucket:
    """`rate` tokens a second up to `burst`: a steady pace with room for short bursts."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


async def _finish(coro: Coroutine[Any, Any, None], waiting: Any) -> None:
    """Carry on a `send` coroutine that `deliver` started and that had to wait.

    `deliver` runs the coroutine's first step inline; when the transport is paused the
    coroutine stops at a future (the transport becoming writable). This waits until that
    future is done, the way an asyncio task would, then resumes the coroutine until it
    finishes. It must not `await` the future itself: the coroutine's own `await` already
    marked it as blocking, and asyncio's C futures refuse a second await of a future in that
    state ("await wasn't used with future"), which would end the coroutine with an error.
    """
    try:
        while True:
            if waiting is None:  # a bare yield: asyncio's way to give up one loop turn
                await asyncio.sleep(0)
            else:
                try:
                    await _until_done(waiting)
                except asyncio.CancelledError:
                    coro.close()
                    raise
            waiting = coro.send(None)
    except StopIteration:
        return


async def _until_done(future: asyncio.Future[Any]) -> None:
    """Wait for `future` to finish, whatever its outcome, without awaiting it."""
    if future.done():
        return
    waiter = asyncio.get_running_loop().create_future()

    def wake(_: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    future.add_done_callback(wake)
    try:
        await waiter
    finally:
        future.remove_done_callback(wake)


class Connection:
    """One client's socket as the hub sees it."""

    __slots__ = (
        "_closer",
        "_closing",
        "_direct",
        "_outbox",
        "_pending",
        "_queue",
        "_queued_bytes",
        "_send",
        "_writer",
        "bucket",
        "close_code",
        "close_timeout",
        "conn_id",
        "expiry",
        "flood_strikes",
        "joined",
        "max_queue_bytes",
        "on_close",
        "on_stuck",
        "presence_events",
        "user",
    )

    def __init__(
        self,
        conn_id: str,
        user: UserInfo,
        send: ASGISend,
        *,
        max_queue_bytes: int,
        rate: float,
        burst: int,
        outbox: Outbox | None = None,
        close_timeout: float = 30.0,
    ) -> None:
        """`outbox` enables direct writes (when `send` allows them); call after the accept."""
        self.conn_id = conn_id
        self.user = user
        self._send = send
        self._outbox = outbox
        self._direct: DirectWriter | None = direct_writer(send) if outbox is not None else None
        # Frames of this loop turn, for the outbox's flush (direct writes only).
        self._pending: list[Outgoing] | None = None
        self.max_queue_bytes = max_queue_bytes
        # Made when the connection first backs up: most never do, and an empty deque costs
        # about 600 bytes, on every one of thousands of connections.
        self._queue: deque[Outgoing] | None = None
        self._queued_bytes = 0
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._closer: asyncio.Task[None] | None = None
        self.close_code: int | None = None
        self.bucket = TokenBucket(rate, burst)
        self.flood_strikes = 0
        # Rooms (or feeds) this connection has joined; the hub keeps the reverse index.
        self.joined: set[str] = set()
        # Rooms whose presence_diff events this connection asked not to get.
        self.presence_events: dict[str, bool] = {}
        # Called once when the connection is closed by the server (for example 4408).
        self.on_close: Callable[[Connection], None] | None = None
        # Closes the connection when its token expires (the node sets and moves it).
        self.expiry: asyncio.TimerHandle | None = None
        # How long a decided close may wait behind what the peer has not read yet; then the
        # socket is dropped without its close frame (see `_send_close`).
        self.close_timeout = close_timeout
        # Called when the close frame could not be sent in time and the socket is not one
        # this connection can abort itself (ASGI `send` only): the endpoint stops serving it.
        self.on_stuck: Callable[[], None] | None = None

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def backed_up(self) -> bool:
        return self._writer is not None

    @property
    def writes_directly(self) -> bool:
        """True when frames bypass ASGI `send` (see `realtime.transport`)."""
        return self._direct is not None

    def reply(self, payload: bytes) -> None:
        """Send one frame of JSON `payload` to this connection alone (see `deliver`).

        A large reply counts against the outgoing bound with everything this connection has
        not taken yet (its transport's buffer too): a reply goes straight into the transport
        while the socket is writable, so a client that asks and never reads would otherwise
        make the node hold one big reply per command. Replies are few, so the check costs
        nothing on the fan-out path.
        """
        size = len(payload)
        if (
            size > _COALESCED_WRITE_MAX
            and not self._closing
            and self.unsent_bytes() + size > self.max_queue_bytes
        ):
            log.info("connection %s too slow: a reply would pass the bound", self.conn_id)
            self.close_soon(CloseCode.TOO_SLOW)
            return
        self.deliver(Outgoing(payload))

    def unsent_bytes(self) -> int:
        """What this connection was given and the peer has not taken: queue, this loop
        turn's frames and the transport's buffer."""
        size = self._queued_bytes
        if self._pending:
            size += sum(len(out.payload) for out in self._pending)
        if self._direct is not None:
            size += self._direct.transport.get_write_buffer_size()
        return size

    def deliver(self, out: Outgoing) -> None:
        """Send a frame now if the socket takes it, else queue it; never blocks the caller."""
        if self._closing:
            return
        if self._writer is not None:
            self._enqueue(out)
            return
        direct = self._direct
        if direct is not None:
            pending = self._pending
            if pending is None:
                # Nothing of this turn is waiting, so writing now keeps the order.
                if out.now and direct.writable.is_set() and direct.alive():
                    try:
                        direct.transport.write(out.wire)
                    except Exception:  # closed under us (aborted): the reader cleans up
                        log.debug("connection %s: write failed", self.conn_id, exc_info=True)
                    return
                self._pending = [out]
                self._outbox.add(self)  # type: ignore[union-attr] # set whenever _direct is
            else:
                pending.append(out)
            return
        sending = self._send({"type": "websocket.send", "text": out.text})
        if not isinstance(sending, Coroutine):  # a server whose send is not a coroutine
            self._writer = asyncio.get_running_loop().create_task(self._drain(sending, None))
            return
        coro = sending
        try:
            waiting = coro.send(None)
        except StopIteration:
            return  # written straight into the transport
        except Exception:  # the peer went away, or the send failed: see `_drain`
            log.debug("connection %s: send failed", self.conn_id, exc_info=True)
            self.close_soon(CloseCode.INTERNAL_ERROR)
            return
        self._writer = asyncio.get_running_loop().create_task(self._drain(coro, waiting))

    def flush(self) -> None:
        """Write this loop turn's frames in one go (the outbox calls it once the turn is done)."""
        pending, self._pending = self._pending, None
        direct = self._direct
        if not pending or direct is None or self._closing:
            return
        if not direct.alive():
            return  # the peer is gone or closing: the reader sees it and cleans up
        if direct.writable.is_set():
            if len(pending) == 1:
                direct.transport.write(pending[0].wire)
                return
            data = b"".join([out.wire for out in pending])
            if len(data) <= _COALESCED_WRITE_MAX:
                direct.transport.write(data)
                return
            # A big turn (a loop that stalled, a burst of large frames): writes of at most
            # _COALESCED_WRITE_MAX while the transport takes them, so a reader that stopped
            # holds at most one such write more than it would without coalescing; the rest
            # goes through the bounded queue.
            start = 0
            while start < len(pending) and direct.writable.is_set():
                end, size = start + 1, len(pending[start].wire)
                while end < len(pending) and size + len(pending[end].wire) <= _COALESCED_WRITE_MAX:
                    size += len(pending[end].wire)
                    end += 1
                direct.transport.write(b"".join([out.wire for out in pending[start:end]]))
                start = end
            del pending[:start]
        for out in pending:  # the transport is paused: the peer is not reading fast enough
            self._enqueue(out)
        if self._queue and not self._closing and self._writer is None:
            self._writer = asyncio.get_running_loop().create_task(self._drain_direct(direct))

    def _enqueue(self, out: Outgoing) -> None:
        if self._closing:  # overflowed earlier in the same flush: nothing more is sent
            return
        size = len(out.payload)
        if self._queued_bytes + size > self.max_queue_bytes:
            log.info("connection %s too slow: outgoing queue over %d bytes", self.conn_id, size)
            self.close_soon(CloseCode.TOO_SLOW)
            return
        if self._queue is None:
            self._queue = deque()
        self._queue.append(out)
        self._queued_bytes += size

    async def _drain_direct(self, direct: DirectWriter) -> None:
        """Write the backlog frame by frame whenever the transport is below its high water."""
        try:
            while self._queue and not self._closing:
                await direct.writable.wait()  # uvicorn sets it when the connection is lost too
                if not direct.alive():
                    return
                while self._queue and direct.writable.is_set():
                    out = self._queue.popleft()
                    self._queued_bytes -= len(out.payload)
                    direct.transport.write(out.wire)
        finally:
            self._writer = None

    async def _drain(self, first: Awaitable[None], waiting: Any) -> None:
        try:
            if isinstance(first, Coroutine):
                await _finish(first, waiting)
            else:
                await first
            while self._queue and not self._closing:
                out = self._queue.popleft()
                self._queued_bytes -= len(out.payload)
                await self._send({"type": "websocket.send", "text": out.text})
        except asyncio.CancelledError:
            raise
        except Exception:
            # The peer went away mid-backlog (the reader sees it and cleans up), or the
            # server's `send` failed: either way nothing more reaches the peer, so close it
            # (or drop it, see `_send_close`) rather than leave it open and silent.
            log.debug("connection %s: send failed", self.conn_id, exc_info=True)
            self._writer = None
            self.close_soon(CloseCode.INTERNAL_ERROR)
        finally:
            # A close decided meanwhile (close_soon) sends its own close frame.
            self._writer = None

    def close_soon(self, code: CloseCode | int, reason: str | None = None) -> None:
        """Close from anywhere (a fan-out loop, a timer) without waiting for it."""
        if self._closing:
            return
        self._closing = True
        self.close_code = int(code)
        self._pending = None
        self._queue = None
        self._queued_bytes = 0
        if self._writer is not None:
            # The socket is stuck on a slow peer; a close frame queued behind it would wait
            # as long. Stop the writer and send the close from a fresh task.
            self._writer.cancel()
            self._writer = None
        self._closer = asyncio.get_running_loop().create_task(self._send_close(reason))
        if self.on_close is not None:
            self.on_close(self)

    async def wait_closed(self) -> None:
        """Until a close decided by `close_soon` is sent (or given up after its timeout).

        The endpoint waits for it before returning: a server drops the socket when the app
        returns, and the close frame still waiting behind a slow reader's backlog would go
        with it, leaving the client without its close code (4408, 4401)."""
        if self._closer is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._closer)

    async def close(self, code: CloseCode | int, reason: str | None = None) -> None:
        """Close after what this loop turn wrote (an error reply, say), not before it."""
        if self._closing:
            return
        if self._pending:
            self.flush()
        self._closing = True
        self.close_code = int(code)
        self._queue = None
        if self._writer is not None:
            self._writer.cancel()
            self._writer = None
        await self._send_close(reason)
        if self.on_close is not None:
            self.on_close(self)

    async def _send_close(self, reason: str | None = None) -> None:
        code = self.close_code or int(CloseCode.NORMAL)
        if reason is None:
            try:
                reason = CLOSE_REASONS[CloseCode(code)]
            except ValueError:
                reason = ""
        try:
            await asyncio.wait_for(
                self._send({"type": "websocket.close", "code": code, "reason": reason}),
                self.close_timeout,
            )
        except Exception:
            # The peer is gone, or it has not read what was sent before the close frame for
            # `close_timeout` seconds. Either way nothing more reaches it: drop the socket, or
            # the connection would stay open and silent, its client believing it is in its
            # rooms while it gets nothing (and never learns to recover).
            self._drop()

    def _drop(self) -> None:
        if self._direct is not None:
            self._direct.transport.abort()  # uvicorn then reports the disconnect to the reader
        elif self.on_stuck is not None:
            self.on_stuck()
