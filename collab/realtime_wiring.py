"""Building the realtime node from settings: backends chosen by URL scheme, storage from
`persistence`, tokens checked by `api.security`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, assert_never

from sqlalchemy.exc import SQLAlchemyError

from api.accounts import Account
from api.deps import ApiContext
from api.routes.items import ITEMS_FEED
from api.schemas import ItemOut
from api.security import InvalidToken, VerifiedTokens
from collab.settings import Settings
from persistence.database import SessionFactory, is_busy
from persistence.history import DatabaseHistory, DatabaseRoomAccess
from persistence.ledger import DatabaseLedger
from persistence.repositories import ItemRepository, UserRepository
from persistence.sink import DatabaseSink
from realtime.backends import backend_kind
from realtime.broker import Broker
from realtime.endpoints import Authenticator, Credential, CredentialStoreBusy
from realtime.node import ROOM, Node, NodeLimits, presence_entry_ttl
from realtime.presence import Presence
from realtime.protocol import CloseCode
from realtime.reconciler import Reconciler
from realtime.storage import MessageSink
from realtime.types import Position, UserInfo
from realtime.user_connections import UserConnections

log = logging.getLogger("collab")
ITEMS_SNAPSHOT_LIMIT = 1000


def build_backends(
    settings: Settings, history: DatabaseHistory
) -> tuple[Broker, Presence, UserConnections]:
    kind = backend_kind(settings.broker_url)
    if kind == "memory":
        from realtime.broker_memory import MemoryBroker
        from realtime.presence_memory import MemoryPresence

        async def seed(channel: str) -> Position | None:
            # One process owns every counter, and the database holds every acknowledged
            # message: continue its epoch after a restart so history and offsets line up.
            if not channel.startswith(ROOM):
                return None
            last = await history.last_position(channel[len(ROOM) :])
            return Position(*last) if last else None

        return (
            MemoryBroker(
                history_window=max(settings.history_window, 1),
                seed=seed,
                max_unconfirmed=settings.max_unconfirmed,
                state_ttl=settings.room_state_ttl,
            ),
            MemoryPresence(timeout=presence_entry_ttl(settings.presence_timeout)),
            UserConnections(),  # one node: the hub's own count is the whole count
        )
    if kind == "redis" or kind == "redis_cluster":
        # One implementation for both: the URL's scheme puts it in cluster mode (sharded
        # pub/sub, slot-aware ledger, no pipelines of scripts); keys are the same.
        from realtime.broker_redis import RedisBroker
        from realtime.presence_redis import RedisPresence
        from realtime.user_connections_redis import RedisUserConnections

        return (
            RedisBroker(
                settings.broker_url,
                history_window=max(settings.history_window, 1),
                node_id=settings.node_id,
                max_unconfirmed=settings.max_unconfirmed,
                state_ttl=settings.room_state_ttl,
            ),
            RedisPresence(
                settings.broker_url, timeout=presence_entry_ttl(settings.presence_timeout)
            ),
            # Refreshed with presence, and as short-lived: a dead node's sockets stop
            # counting against their users within the presence timeout.
            RedisUserConnections(
                settings.broker_url, ttl=presence_entry_ttl(settings.presence_timeout)
            ),
        )
    assert_never(kind)


def build_sink(settings: Settings, sessions: SessionFactory) -> MessageSink:
    """Celery workers store messages when a Celery broker is configured; else this process."""
    if not settings.celery_broker_url:
        return DatabaseSink(
            sessions,
            max_batch=settings.persist_batch_size,
            max_delay=settings.persist_batch_delay,
            max_pending=settings.persist_max_pending,
            timeout=settings.persist_timeout,
        )
    from persistence.celery_sink import CeleryMessageSink
    from workers.app import create_celery_app

    return CeleryMessageSink(
        create_celery_app(settings, producer=True),
        queue_name=settings.celery_queue,
        max_batch=settings.persist_batch_size,
        max_delay=settings.persist_batch_delay,
        send_timeout=settings.celery_send_timeout,
    )


def build_node(settings: Settings, sessions: SessionFactory) -> Node:
    history = DatabaseHistory(sessions)
    broker, presence, user_connections = build_backends(settings, history)

    async def items_snapshot() -> list[dict[str, Any]]:
        # The newest items, oldest of them first: a dashboard that reconnects must see what
        # changed last, and the node cuts from the front when the list is over a reply's size.
        async with sessions() as session:
            items = await ItemRepository(session).newest(ITEMS_SNAPSHOT_LIMIT)
            return [ItemOut.model_validate(i).model_dump(mode="json") for i in reversed(items)]

    return Node(
        node_id=settings.node_id,
        broker=broker,
        presence=presence,
        sink=build_sink(settings, sessions),
        history=history,
        access=DatabaseRoomAccess(sessions),
        limits=NodeLimits(
            max_body_bytes=settings.max_body_bytes,
            max_frame_bytes=settings.max_frame_bytes,
            rate=settings.rate_limit,
            burst=settings.rate_burst,
            max_connections_per_user=settings.max_connections_per_user,
            max_connections=settings.max_connections,
            outgoing_queue_bytes=settings.outgoing_queue_bytes,
            close_timeout=settings.close_timeout,
            heartbeat=settings.heartbeat,
            presence_timeout=settings.presence_timeout,
            max_reply_bytes=settings.max_reply_bytes,
            max_channels_per_connection=settings.max_channels_per_connection,
            public_feeds=tuple(settings.public_feeds),
            feed_grants=tuple(
                (rule, frozenset(holders)) for rule, holders in settings.feed_grants.items()
            ),
            max_backlog_bytes=settings.recovery_backlog_bytes,
        ),
        snapshots={ITEMS_FEED: items_snapshot},
        reconciler=Reconciler(
            broker,
            DatabaseLedger(sessions),
            grace=settings.reconcile_grace,
            interval=settings.reconcile_interval,
        ),
        user_connections=user_connections,
        stats_interval=settings.stats_feed_interval,
    )


def token_authenticator(secret: str, api: Callable[[], ApiContext]) -> Authenticator:
    """Tickets and tokens, checked as the REST API checks them: the account must still
    exist with the token version the credential was issued under."""
    tokens = VerifiedTokens(secret)

    async def authenticate(credential: Credential) -> UserInfo | None:
        context = api()
        if credential.kind == "ticket":
            if context.tickets is None:
                return None
            holder = await context.tickets.redeem(credential.value)
            if holder is None:
                return None
            user_id, version, expires_at = holder.user_id, holder.version, holder.expires_at
        else:
            try:
                claims = tokens.decode(credential.value)
            except InvalidToken:
                return None
            user_id, version, expires_at = claims.user_id, claims.version, claims.expires_at

        async def load() -> Account | None:
            try:
                async with context.sessions() as session:
                    user = await UserRepository(session).get(user_id)
            except SQLAlchemyError as error:
                if is_busy(error):  # overload (the pool's wait): 1013, not 1011
                    raise CredentialStoreBusy(str(error)) from error
                raise
            if user is None:
                return None
            return Account(user.id, user.token_version, user.display_name, user.role)

        if context.accounts is not None:
            account = await context.accounts.holder(user_id, version, load)
        else:
            account = await load()
            account = account if account is not None and account.version == version else None
        if account is None:
            return None
        return UserInfo(
            id=str(account.id), name=account.name, role=account.role, expires_at=expires_at
        )

    return authenticate


@contextlib.contextmanager
def close_with_1001_on_exit(node: Node, timeout: float) -> Any:
    """On SIGTERM/SIGINT, tell every client 1001 before the server's own shutdown runs.

    Uvicorn closes WebSockets itself on shutdown, with 1012; our protocol promises 1001
    ("reconnect and recover"). So the server's signal handler is wrapped: the node closes
    its connections first (bounded by `timeout`), then the original handler goes on.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: FrameType | None) -> None:
        original = previous.get(signum)

        async def drain_then_exit() -> None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(node.disconnect_all(CloseCode.GOING_AWAY), timeout)
            node.closing = True
            if callable(original):
                original(signum, frame)

        node.closing = True  # refuse new connections from now on
        loop.call_soon_threadsafe(lambda: loop.create_task(drain_then_exit()))

    for wanted in (signal.SIGTERM, signal.SIGINT):
        current = signal.getsignal(wanted)
        if callable(current) and current is not signal.default_int_handler:
            previous[int(wanted)] = current
            signal.signal(wanted, handler)
    try:
        yield
    finally:
        for signum, original in previous.items():
            with contextlib.suppress(ValueError):
                signal.signal(signum, original)


Getter = Callable[[], Node]
