"""Publishing to rooms and feeds from Python code outside the web process.

A Celery task, a cron script or a data pipeline publishes through the broker the servers
share (Redis), without running a server of its own (python-socketio's `write_only` manager is
the model). It is the same path as a member's publish: `Node.publish_as` numbers the message,
delivers it to every member on every node, stores it (through the sink the settings name:
Celery, or the database directly) and honours `client_msg_id`.

    from collab.publisher import Publisher

    async with Publisher.from_env(name="reports") as publisher:
        await publisher.publish("general", {"text": "nightly report is ready"},
                                client_msg_id="report-2026-11-29")
        await publisher.publish_feed("cpu", {"load": 0.4})

From synchronous code (a Celery task): `publish_sync(settings, "general", {...})`.

The settings are the servers' own (`COLLAB_BROKER_URL`: a Redis or a Redis Cluster;
`COLLAB_DATABASE_URL`, `COLLAB_CELERY_BROKER_URL`): the embedded `memory://` broker lives
inside one server process and cannot be reached from outside, so it is refused.
"""

from __future__ import annotations

import asyncio
import os
from types import TracebackType
from typing import Any

import orjson

from collab.realtime_wiring import build_node
from collab.settings import Settings
from persistence.database import create_engine, create_session_factory
from realtime import protocol as p
from realtime.backends import backend_kind
from realtime.node import Node, PublishUnconfirmed
from realtime.types import Position, UserInfo

__all__ = ["PublishUnconfirmed", "Published", "Publisher", "publish_sync"]


class Published:
    """Where a published message is: its room, epoch, offset and id (an ack's content)."""

    __slots__ = ("epoch", "msg_id", "offset", "room")

    def __init__(self, room: str, epoch: str, offset: int, msg_id: str) -> None:
        self.room = room
        self.epoch = epoch
        self.offset = offset
        self.msg_id = msg_id

    def __repr__(self) -> str:
        return f"Published({self.room!r}, {self.epoch!r}, {self.offset}, {self.msg_id!r})"


class Publisher:
    """Publishes as `name` (messages carry `{"id": "service:<name>", "name": <name>}`).

    Use it as an async context manager, or call `start` and `close`. One publisher per
    process and event loop; it holds a broker connection pool and a database engine.
    """

    def __init__(self, settings: Settings, *, name: str = "service") -> None:
        if backend_kind(settings.broker_url) == "memory":
            raise ValueError(
                "Publisher needs the servers' shared broker (COLLAB_BROKER_URL=redis://... or "
                "redis+cluster://...); memory:// lives inside one server process"
            )
        if not p.is_valid_name(name):
            raise ValueError("name: 1-64 characters of A-Z a-z 0-9 _ - . :")
        self.settings = settings
        # Not a number, so never an account's id: a private room never admits it, and its
        # client_msg_ids cannot collide with any account's.
        self.user = UserInfo(id=f"service:{name}", name=name)
        self._engine = create_engine(settings.database_url)
        publisher_id = f"publisher-{name}-{os.getpid()}"
        self._node: Node = build_node(
            settings.model_copy(update={"node_id": publisher_id}),
            create_session_factory(self._engine),
        )
        self._started = False

    @classmethod
    def from_env(cls, *, name: str = "service") -> Publisher:
        """Settings from the environment, as `collab serve` reads them."""
        return cls(Settings(), name=name)

    async def start(self) -> None:
        # Only what publishing needs: the sink's writer. The broker publishes without its
        # listener (nothing here subscribes), and no presence, sweeper or reconciler runs:
        # the servers' reconcilers look after a message whose storage failed.
        await self._node.sink.start()
        self._started = True

    async def close(self) -> None:
        if self._started:
            self._started = False
            await self._node.sink.close()
        await self._node.broker.close()
        await self._node.presence.close()
        await self._engine.dispose()

    async def __aenter__(self) -> Publisher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def publish(
        self, room: str, body: dict[str, Any], *, client_msg_id: str | None = None
    ) -> Published:
        """Publish `body` to `room`; returns once storage confirmed it (an ack).

        Raises `ValueError` for a bad room, body or client_msg_id (the protocol's rules),
        `PermissionError` for a private room, `realtime.broker.BrokerUnavailable` when nothing
        was published (or, with `maybe_sent` true, when the broker's reply was lost and it may
        have been), and `PublishUnconfirmed` when the message was delivered but storage did
        not confirm it. Retrying with the same `client_msg_id` is safe in each case.
        """
        frame: dict[str, Any] = {"type": "publish", "room": room, "body": body}
        if client_msg_id is not None:
            frame["client_msg_id"] = client_msg_id
        try:
            command = p.parse_command(
                orjson.dumps(frame), "chat", max_body_bytes=self.settings.max_body_bytes
            )
            assert isinstance(command, p.Publish)
            result = await self._node.publish_as(self.user, command)
        except p.ProtocolError as exc:
            if exc.code == p.ErrorCode.FORBIDDEN:
                raise PermissionError(exc.message) from None
            raise ValueError(exc.message) from None
        return Published(room, result.epoch, result.offset, result.msg_id)

    async def publish_feed(self, feed: str, data: Any) -> Position:
        """Publish one update to a feed's subscribers (feeds are not stored)."""
        if not p.is_valid_name(feed):
            raise ValueError("feed: 1-64 characters of A-Z a-z 0-9 _ - . :")
        return await self._node.publish_feed(feed, data)


def publish_sync(
    settings: Settings,
    room: str,
    body: dict[str, Any],
    *,
    client_msg_id: str | None = None,
    name: str = "service",
) -> Published:
    """One publish from synchronous code (a Celery task): its own event loop, then closed.

    For many publishes, keep one `Publisher` on a loop of your own instead.
    """

    async def once() -> Published:
        async with Publisher(settings, name=name) as publisher:
            return await publisher.publish(room, body, client_msg_id=client_msg_id)

    return asyncio.run(once())
