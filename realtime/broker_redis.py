"""The many-node broker (`redis://`), on `redis.asyncio`.

Keys (every key of a channel shares the hash tag `{<channel>}`, so one channel's keys live in
one Redis Cluster slot and the Lua scripts stay legal there):

- `collab:{<channel>}:meta`: hash, `e` = epoch, `o` = last offset, `s` = the storage mark of a
  durable channel (every offset up to it is confirmed stored).
- `collab:{<channel>}:stream`: stream of the recent window, entry id `<offset>-0`, one field
  `f` = the frame. Trimmed to `history_window` entries, except that a durable channel keeps
  what is above its storage mark (up to `max_unconfirmed`). Deleted whenever a new meta is
  created, so every entry belongs to the current epoch.
- Both expire after `state_ttl` seconds without a publication (0: never), so that a Redis
  does not keep every room ever used; the channel then comes back with a new epoch. A
  durable channel's keys never expire while `s < o`: its publish clears the expiry, and the
  confirmation that brings `s` up to `o` sets it again.
- `collab:{<channel>}:reconciling`: a short lock, so one node at a time verifies a channel.
- `collab:unconfirmed:<db>`: sorted set of durable channels that may have unconfirmed
  publications, scored by the Redis time a node last published to them. The one key outside
  a channel's slot: on a Redis Cluster it is split in 16, `collab:unconfirmed:{g<n>}:0`, a
  channel in the set `crc32(channel) % 16`, so the sets spread over the shards.
- `collab:{<channel>}:idem:<key>`: string `"<epoch> <offset> <msg_id>"`, TTL `idempotency_ttl`.

Pub/sub channel `collab:{<channel>}:ps:<db>` (pub/sub ignores databases, so the db number is
part of the name: two deployments on different databases of one Redis never hear each other).
On a Redis Cluster it is a sharded channel (SPUBLISH/SSUBSCRIBE) in the channel's own slot,
so a publication travels only within the shard that owns the room.
Payloads carry what the listener needs without parsing JSON:

- publication: `b"m" + epoch + b" " + offset + b"\\n" + frame`
- event: `b"e\\n" + frame`, or `b"x" + exclude_user + b"\\n" + frame`; a presence event
  `b"p\\n" + frame`

Failure model: every command runs once (no retry; a blind retry of the publish script could
publish twice) with 2 s socket timeouts, and a connection or timeout error becomes
`BrokerUnavailable`. A publish whose reply was lost may still have happened; a client retry
with the same idempotency key then gets the first ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import zlib
from collections.abc import Callable, Iterator
from typing import cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, Connection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

from realtime.broker import (
    Broker,
    BrokerHandler,
    BrokerUnavailable,
    PositionSeed,
    Publication,
    PublishResult,
    StorageMark,
    build_frame,
    check_epoch,
    frame_head,
)
from realtime.redis_client import (
    UNAVAILABLE,
    AnyRedis,
    is_cluster,
    lua_script,
    may_have_run,
    redis_client,
    redis_cluster_client,
)
from realtime.types import Position, new_epoch

__all__ = ["RedisBroker"]

log = logging.getLogger(__name__)

_PREFIX = "collab:"
_SOCKET_TIMEOUT = 2.0
# A silent pub/sub connection is pinged after this long, and declared dead when the answer
# does not come within the same time again: a half-open TCP connection is found in 2 x this.
_PING_INTERVAL = 5.0
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
_SUBSCRIBE_CHUNK = 1000
_UNAVAILABLE = UNAVAILABLE
# A cluster node's unconfirmed ledger is split into this many sets, each in its own slot.
_UNCONFIRMED_GROUPS = 16
# What a pub/sub connection of our own takes over from the cluster client's settings.
_CONNECTION_SETTINGS = frozenset(
    {"username", "password", "credential_provider", "client_name", "socket_keepalive"}
)
_NO_ROUTE: tuple[type[Exception], ...] = (RedisClusterException, *UNAVAILABLE)
# How often the cluster watcher looks at its listeners (a failover takes seconds).
_TOPOLOGY_CHECK = 0.5

# Writes are ordered so that a failing XADD (the only command that can fail on good input)
# leaves nothing changed: Redis does not roll a script back.
_PUBLISH_LUA = lua_script("broker_publish.lua")

# Creating the meta is the SETNX of a channel's life: whoever comes first names the epoch.
_ENSURE_LUA = lua_script("broker_ensure.lua")

# Meta and window read together, so the offsets checked belong to the epoch compared.
_RECENT_LUA = lua_script("broker_recent.lua")


# The window between two offsets, only in the epoch asked about.
_WINDOW_LUA = lua_script("broker_window.lua")

# Raise the storage mark (never lower it, never past the top) and trim what it frees.
_CONFIRM_LUA = lua_script("broker_confirm.lua")

# Scored by Redis's own clock, so that nodes whose clocks differ agree on idleness.
_MARK_LUA = lua_script("broker_mark.lua")

# A channel leaves the set only when all it published is confirmed and nobody published to it
# for ARGV[2] seconds. A node re-marks a channel at most every `_MARK_REFRESH` seconds, and
# ARGV[2] is longer than that, so a publish that this removal could miss cannot exist.
_UNMARK_LUA = lua_script("broker_unmark.lua")
_MARK_REFRESH = 5.0
_UNMARK_IDLE = 20


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except _UNAVAILABLE as exc:
        raise BrokerUnavailable(str(exc) or type(exc).__name__) from exc


class _Listener:
    """One pub/sub connection and the channels subscribed on it, kept alive by a supervised
    task: a single Redis has one; a Redis Cluster one per master that owns a wanted channel.

    `sharded`: SSUBSCRIBE (Redis 7 sharded pub/sub: a channel's messages stay on the shard
    that owns its slot) instead of SUBSCRIBE, one channel per command, since one SSUBSCRIBE
    may only name channels of one slot.
    """

    def __init__(
        self,
        make_connection: Callable[[], AbstractConnection],
        broker: RedisBroker,
        *,
        sharded: bool = False,
        label: str = "Redis",
    ) -> None:
        self._make_connection = make_connection
        self._broker = broker
        self._sharded = sharded
        self.label = label
        self._subscribe_cmd, self._unsubscribe_cmd = (
            ("SSUBSCRIBE", "SUNSUBSCRIBE") if sharded else ("SUBSCRIBE", "UNSUBSCRIBE")
        )
        self._message_kind = b"smessage" if sharded else b"message"
        self._confirm_kind = b"ssubscribe" if sharded else b"subscribe"
        self._task: asyncio.Task[None] | None = None
        self.first_attempt = asyncio.Event()
        self.healthy = False
        # Channels whose slot this shard gave away while connected (Redis 7 tells a sharded
        # subscriber with an unasked SUNSUBSCRIBE): the broker moves them to their new owner.
        self.lost: set[str] = set()
        # The live pub/sub connection; set only while healthy, so nobody writes to a
        # connection the listener has given up on.
        self._conn: AbstractConnection | None = None
        # Channels with local subscribers (the truth a reconnect restores), and the reverse
        # map from pub/sub name for incoming messages.
        self.wanted: dict[str, bytes] = {}
        self._by_name: dict[bytes, str] = {}
        self._wanted_version = 0  # bumped on every change of `wanted`
        # Per channel on the current connection: SUBSCRIBE commands sent and confirmations
        # read. A subscriber waits for the confirmation of its own SUBSCRIBE (Redis answers in
        # order), so a subscribe/unsubscribe/subscribe race never returns early.
        self._sent: dict[str, int] = {}
        self._confirmed: dict[str, int] = {}
        self._waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        self._outstanding = 0  # SUBSCRIBEs sent on the current connection, not yet confirmed
        self._write_lock = asyncio.Lock()

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"collab-{self.label}-listener")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
        for waiters in self._waiters.values():
            for _, future in waiters:
                if not future.done():
                    future.set_result(None)
        self._waiters.clear()
        self.healthy = False

    # Subscriptions ----------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """See `RedisBroker.subscribe`."""
        name = self.wanted.get(channel)
        if name is None:
            name = self._broker.pubsub_name(channel)
            self.wanted[channel] = name
            self._by_name[name] = channel
            self._wanted_version += 1
            conn = self._live()
            if conn is None:
                raise BrokerUnavailable(f"{self.label} pub/sub is reconnecting")
            target = self._sent.get(channel, 0) + 1
            self._sent[channel] = target
            self._outstanding += 1
            future = self._add_waiter(channel, target)
            await self._send(conn, self._subscribe_cmd, name)
        else:
            if self._live() is None:
                raise BrokerUnavailable(f"{self.label} pub/sub is reconnecting")
            target = self._sent.get(channel, 0)
            if self._confirmed.get(channel, 0) >= target:
                return
            future = self._add_waiter(channel, target)
        try:
            await asyncio.wait_for(future, _SOCKET_TIMEOUT)
        except TimeoutError:
            raise BrokerUnavailable(f"{self.label} did not confirm the subscription") from None
        finally:
            self._drop_waiter(channel, future)

    async def unsubscribe(self, channel: str) -> None:
        name = self.wanted.pop(channel, None)
        if name is None:
            return
        del self._by_name[name]
        self._wanted_version += 1
        self._forget_if_settled(channel)
        conn = self._live()
        if conn is not None:
            await self._send(conn, self._unsubscribe_cmd, name)

    def _live(self) -> AbstractConnection | None:
        """The pub/sub connection, if a command may be written to it now. Writing to one the
        listener has given up on would make redis-py quietly reconnect it underneath."""
        conn = self._conn
        if conn is None or not self.healthy or not conn.is_connected:
            return None
        return conn

    async def _send(self, conn: AbstractConnection, *args: str | bytes) -> None:
        """Shielded: redis-py drops a connection whose write was cancelled, and one caller
        going away must not cost every channel of the node a resubscription. A failed write
        is the listener's to notice: it reconnects and resubscribes what is wanted."""
        await asyncio.shield(self._send_now(conn, *args))

    async def _send_now(self, conn: AbstractConnection, *args: str | bytes) -> None:
        # The lock keeps a write and the listener's teardown of the connection apart
        # (redis-py fails on a writer removed mid-send).
        async with self._write_lock:
            if self._conn is not conn or not conn.is_connected:
                return
            with contextlib.suppress(*_UNAVAILABLE):
                await conn.send_command(*args, check_health=False)

    def _add_waiter(self, channel: str, target: int) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(channel, []).append((target, future))
        return future

    def _drop_waiter(self, channel: str, future: asyncio.Future[None]) -> None:
        waiters = self._waiters.get(channel)
        if waiters is None:
            return
        waiters[:] = [(t, f) for t, f in waiters if f is not future]
        if not waiters:
            del self._waiters[channel]

    def _forget_if_settled(self, channel: str) -> None:
        """Keeps the per-connection counters bounded by the channels in use."""
        if channel not in self.wanted and self._confirmed.get(channel, 0) >= self._sent.get(
            channel, 0
        ):
            self._sent.pop(channel, None)
            self._confirmed.pop(channel, None)

    def _on_confirmed(self, channel: str) -> None:
        self._outstanding -= 1
        count = self._confirmed.get(channel, 0) + 1
        self._confirmed[channel] = count
        waiters = self._waiters.get(channel)
        if waiters:
            keep = []
            for target, future in waiters:
                if target <= count:
                    if not future.done():
                        future.set_result(None)
                else:
                    keep.append((target, future))
            if keep:
                self._waiters[channel] = keep
            else:
                del self._waiters[channel]
        self._forget_if_settled(channel)

    # The listener -----------------------------------------------------------------------

    async def _supervise(self) -> None:
        delay = _BACKOFF_MIN
        announce = False
        failures = 0
        while True:
            try:
                conn = self._make_connection()
            except Exception as exc:  # no slot map yet, or a bad setting: wait, never die
                log.debug("%s pub/sub connection not made: %s", self.label, exc)
                self.first_attempt.set()
                await asyncio.sleep(_BACKOFF_MAX)
                continue
            try:
                buffered = await self._resubscribe(conn)
                self._conn = conn
                self.healthy = True
                self.first_attempt.set()
                delay = _BACKOFF_MIN
                failures = 0
                if announce:
                    log.info(
                        "%s pub/sub back; %d channels resubscribed", self.label, len(self.wanted)
                    )
                    self._broker.announce(sorted(self.wanted))
                for channel, payload in buffered:
                    if channel in self.wanted:
                        self._broker.dispatch(channel, payload)
                await self._listen(conn)
            except _UNAVAILABLE as exc:
                # One warning per outage; the retries of a long one would flood the log.
                failures += 1
                level = logging.WARNING if failures == 1 else logging.DEBUG
                log.log(level, "%s pub/sub connection failed (%s); retrying", self.label, exc)
            except Exception:
                log.exception("%s pub/sub listener failed; reconnecting", self.label)
            finally:
                self.healthy = False
                async with self._write_lock:
                    self._conn = None
                    await conn.disconnect(nowait=True)
            self.first_attempt.set()
            announce = True
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, _BACKOFF_MAX)

    async def _resubscribe(self, conn: AbstractConnection) -> list[tuple[str, bytes]]:
        """Connects and subscribes every wanted channel, waiting for every confirmation, so
        that on_resubscribed (and therefore recovery) comes after the subscriptions are live.
        Messages that arrive meanwhile are returned, to be delivered after the announcement.

        `subscribe` and `unsubscribe` may change the wanted set meanwhile (they only record
        while unhealthy); the loop catches up with them, and the last check of the set is not
        separated from going healthy by any await.
        """
        await conn.connect()  # type: ignore[no-untyped-call]
        self._sent.clear()
        self._confirmed.clear()
        self._outstanding = 0
        self.lost.clear()
        # Waiters from the lost connection are satisfied by this connection's SUBSCRIBE.
        for channel in list(self._waiters):
            if channel in self.wanted:
                self._waiters[channel] = [(1, future) for _, future in self._waiters[channel]]
            else:
                for _, future in self._waiters.pop(channel):
                    if not future.done():
                        future.set_result(None)
        buffered: list[tuple[str, bytes]] = []
        dropped: set[str] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _SOCKET_TIMEOUT
        checked = -1
        # One SSUBSCRIBE names channels of one slot only: one command per channel.
        chunk_size = 1 if self._sharded else _SUBSCRIBE_CHUNK
        while True:
            if checked == self._wanted_version:
                if self._outstanding == 0:
                    return buffered
            else:
                # Scanning the sets only when they changed keeps a reconnect with many
                # channels linear.
                checked = self._wanted_version
                stale = [c for c in self._sent if c not in self.wanted and c not in dropped]
                fresh = [c for c in self.wanted if c not in self._sent or c in dropped]
                if stale:
                    dropped.update(stale)
                    for start in range(0, len(stale), chunk_size):
                        names = [
                            self._broker.pubsub_name(c) for c in stale[start : start + chunk_size]
                        ]
                        await conn.send_command(self._unsubscribe_cmd, *names, check_health=False)
                for start in range(0, len(fresh), chunk_size):
                    chunk = fresh[start : start + chunk_size]
                    for channel in chunk:
                        dropped.discard(channel)
                        self._sent[channel] = self._sent.get(channel, 0) + 1
                        self._outstanding += 1
                    names = [self._broker.pubsub_name(channel) for channel in chunk]
                    await conn.send_command(self._subscribe_cmd, *names, check_health=False)
                    deadline = loop.time() + _SOCKET_TIMEOUT
                continue
            reply = await conn.read_response(
                timeout=max(0.001, deadline - loop.time()), disconnect_on_error=False
            )
            if reply is None:
                raise RedisTimeoutError(f"{self.label} did not confirm the resubscription")
            message = self._handle(reply)
            if message is not None:
                buffered.append(message)

    async def _listen(self, conn: AbstractConnection) -> None:
        pinged = False
        while True:
            reply = await conn.read_response(timeout=_PING_INTERVAL, disconnect_on_error=False)
            if reply is None:
                if pinged:
                    raise RedisTimeoutError(
                        f"{self.label} stopped answering on the pub/sub connection"
                    )
                async with self._write_lock:
                    await conn.send_command("PING", check_health=False)
                pinged = True
                continue
            pinged = False
            message = self._handle(reply)
            if message is not None:
                self._broker.dispatch(*message)

    def _handle(self, reply: object) -> tuple[str, bytes] | None:
        """A message for a wanted channel, or None after bookkeeping."""
        if not isinstance(reply, list) or len(reply) < 2:
            return None  # PONG outside subscribed mode: liveness only
        kind = reply[0]
        if kind == self._message_kind and len(reply) == 3:
            channel = self._by_name.get(reply[1])
            if channel is None:
                return None  # unsubscribed while the message was on its way
            return channel, reply[2]
        if kind == self._confirm_kind:
            self._on_confirmed(self._broker.channel_of(reply[1]))
        elif kind == b"sunsubscribe" and reply[1] in self._by_name:
            # Not asked for: the shard no longer owns the channel's slot (resharding, or this
            # master demoted). The broker resubscribes it where it lives now.
            self.lost.add(self._by_name[reply[1]])
        return None


class RedisBroker(Broker):
    """Pub/sub connections subscribed to the channels with local members, each kept alive by
    a supervised listener (`_Listener`); commands go through a separate connection pool.

    With a `redis+cluster://` URL: commands through a Redis Cluster client (a channel's
    keys share a slot, so each script runs on one shard), sharded pub/sub with one listener
    per master that owns a wanted channel, and a watcher that follows the topology: when a
    listener loses its master (failover) or is told a slot moved, it refreshes the slot map,
    moves the channels to their new owners and tells the handler to recover them.
    """

    def __init__(
        self,
        url: str,
        *,
        history_window: int = 1000,
        idempotency_ttl: float = 86400,
        seed: PositionSeed | None = None,
        node_id: str = "",
        max_unconfirmed: int = 100_000,
        state_ttl: float = 0,
    ) -> None:
        if history_window < 1:
            raise ValueError("history_window must be at least 1")
        self.history_window = history_window
        self.idempotency_ttl = idempotency_ttl
        self.max_unconfirmed = max(max_unconfirmed, history_window)
        self.state_ttl = state_ttl
        self._ttl_ms = max(0, int(state_ttl * 1000))
        self._seed = seed
        self.node_id = node_id
        self._cluster_mode = is_cluster(url)
        client_name = f"collab-{node_id}" if node_id else ""
        self._cluster: RedisCluster | None = None
        self._client: AnyRedis
        if self._cluster_mode:
            self._cluster = redis_cluster_client(
                url, timeout=_SOCKET_TIMEOUT, client_name=client_name
            )
            self._client = self._cluster
            self._db = 0
        else:
            single = redis_client(url, timeout=_SOCKET_TIMEOUT, client_name=client_name)
            self._client = single
            self._db = int(single.connection_pool.connection_kwargs.get("db") or 0)
        self._publish_script = self._client.register_script(_PUBLISH_LUA)
        self._ensure_script = self._client.register_script(_ENSURE_LUA)
        self._recent_script = self._client.register_script(_RECENT_LUA)
        self._window_script = self._client.register_script(_WINDOW_LUA)
        self._confirm_script = self._client.register_script(_CONFIRM_LUA)
        self._mark_script = self._client.register_script(_MARK_LUA)
        self._unmark_script = self._client.register_script(_UNMARK_LUA)
        self._publish_cmd = "SPUBLISH" if self._cluster_mode else "PUBLISH"
        self._marked: dict[str, float] = {}  # durable channel -> when this node last marked it

        self._handler: BrokerHandler | None = None
        self._started = False
        self._refresh_failing = False  # the cluster watcher's last slot map refresh failed
        self._topology_suspect = False  # a subscribe failed: the watcher refreshes the map
        self._closed = False
        # Single Redis: one listener. Cluster: one per master (by node name), and where each
        # wanted channel is subscribed.
        self._listeners: dict[str, _Listener] = {}
        self._route: dict[str, str] = {}
        self._watcher: asyncio.Task[None] | None = None

    # Keys and names ---------------------------------------------------------------------

    @staticmethod
    def _key(channel: str, suffix: str) -> str:
        return f"{_PREFIX}{{{channel}}}:{suffix}"

    def pubsub_name(self, channel: str) -> bytes:
        return f"{_PREFIX}{{{channel}}}:ps:{self._db}".encode()

    def channel_of(self, name: bytes) -> str:
        head = len(_PREFIX) + 1
        tail = len(f"}}:ps:{self._db}")
        return name[head:-tail].decode()

    def _unconfirmed_key(self, channel: str) -> str:
        """One set on a single Redis. On a cluster, one per group of channels (by a hash of
        the name), each in a slot of its own, so the ledger spreads over the shards and no
        shard's loss takes every room's entry with it."""
        if not self._cluster_mode:
            return f"{_PREFIX}unconfirmed:{self._db}"
        return self._group_key(zlib.crc32(channel.encode()) % _UNCONFIRMED_GROUPS)

    def _group_key(self, group: int) -> str:
        return f"{_PREFIX}unconfirmed:{{g{group}}}:{self._db}"

    def _unconfirmed_keys(self) -> list[str]:
        if not self._cluster_mode:
            return [f"{_PREFIX}unconfirmed:{self._db}"]
        return [self._group_key(group) for group in range(_UNCONFIRMED_GROUPS)]

    # Lifecycle --------------------------------------------------------------------------

    async def start(self, handler: BrokerHandler) -> None:
        """Returns after the first connection attempt; if Redis is down, the node starts
        unhealthy and the listener keeps trying (the hub learns through on_resubscribed)."""
        if self._started:
            raise RuntimeError("broker already started")
        self._started = True
        self._handler = handler
        if self._cluster is None:
            client = cast(aioredis.Redis, self._client)
            listener = _Listener(
                lambda: cast(AbstractConnection, client.connection_pool.make_connection()),  # type: ignore[no-untyped-call]
                self,
            )
            self._listeners[""] = listener
            listener.start()
            await listener.first_attempt.wait()
            return
        try:
            await self._cluster.initialize()
        except _NO_ROUTE as exc:
            # Unready until the watcher reaches the cluster; the reason (a node down, a
            # certificate that does not verify) is for the operator to read now.
            log.warning("Redis Cluster not reachable (%s); retrying", exc)
            self._refresh_failing = True
        self._watcher = asyncio.create_task(self._watch(), name="collab-redis-cluster-watcher")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        for listener in list(self._listeners.values()):
            await listener.close()
        self._listeners.clear()
        self._handler = None
        await self._client.aclose()

    @property
    def healthy(self) -> bool:
        if self._cluster is None:
            listener = self._listeners.get("")
            return listener is not None and listener.healthy
        # A cluster node is healthy while the slot map is known and every shard it listens to
        # answers; a master in failover makes it unready until the watcher has moved on.
        return bool(self._cluster.nodes_manager.slots_cache) and all(
            listener.healthy for listener in self._listeners.values() if listener.wanted
        )

    # Subscriptions ----------------------------------------------------------------------

    async def subscribe(self, channel: str) -> None:
        """Returns once Redis confirms the subscription, so that a position read afterwards
        cannot miss a publication in between.

        Raises BrokerUnavailable when that cannot be confirmed (Redis down or slow). The
        channel then still counts as subscribed: the listener subscribes it when Redis is
        back and names it in on_resubscribed; call `unsubscribe` to give it up.
        """
        if self._cluster is None:
            await self._listeners[""].subscribe(channel)
            return
        name = self._route.get(channel)
        if name is None:
            name = self._owner(channel)
            self._route[channel] = name
        listener = await self._listener_for(name)
        try:
            await listener.subscribe(channel)
        except BrokerUnavailable:
            # The owner as last known does not answer: a failover may have moved the slot,
            # and nothing else may refresh the map (a join subscribes before it sends a
            # command, and the hub gives the channel up at once). The watcher looks now.
            self._topology_suspect = True
            raise

    async def unsubscribe(self, channel: str) -> None:
        if self._cluster is None:
            await self._listeners[""].unsubscribe(channel)
            return
        name = self._route.pop(channel, None)
        if name is not None and name in self._listeners:
            await self._listeners[name].unsubscribe(channel)

    # The cluster's topology -----------------------------------------------------------------

    def _owner(self, channel: str) -> str:
        """The name (host:port) of the master that owns the channel's slot, as last known;
        "" when the slot map is not known yet (the watcher routes it once it is)."""
        assert self._cluster is not None
        try:
            node = self._cluster.get_node_from_key(self.pubsub_name(channel).decode())
        except _NO_ROUTE:
            return ""
        return node.name if node is not None else ""

    async def _listener_for(self, name: str) -> _Listener:
        listener = self._listeners.get(name)
        if listener is not None:
            if name:
                # Created by a concurrent call that is still connecting it: a burst of joins
                # into a new shard's rooms waits for that first attempt too.
                await listener.first_attempt.wait()
            return listener
        if not name:
            # No slot map yet: the channel waits, wanted, in a listener that never connects
            # until the watcher knows where it lives.
            listener = _Listener(self._no_connection, self, sharded=True, label="Redis Cluster")
            self._listeners[name] = listener
            return listener
        host, _, port = name.rpartition(":")
        assert self._cluster is not None
        # The cluster client's own connection settings (credentials, TLS, client name), for a
        # connection of our own: redis-py's cluster pub/sub reconnects and resubscribes
        # silently, and the hub must hear of every reconnect (on_resubscribed).
        given = self._cluster.connection_kwargs
        connection_class = given.get("connection_class", Connection)
        kwargs = {
            key: value
            for key, value in given.items()
            if key in _CONNECTION_SETTINGS or key.startswith("ssl_")
        }
        kwargs.update(
            host=host,
            port=int(port),
            socket_timeout=_SOCKET_TIMEOUT,
            socket_connect_timeout=_SOCKET_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )

        def connect() -> AbstractConnection:
            return cast(AbstractConnection, connection_class(**kwargs))

        listener = _Listener(connect, self, sharded=True, label=f"Redis Cluster {name}")
        self._listeners[name] = listener
        listener.start()
        await listener.first_attempt.wait()
        return listener

    @staticmethod
    def _no_connection() -> AbstractConnection:
        raise RedisConnectionError("no slot map yet")

    async def _watch(self) -> None:
        """Follows the cluster's topology: while any listener is down or lost a slot (or the
        slot map is unknown), refresh the slot map and move channels to their owners."""
        while True:
            await asyncio.sleep(_TOPOLOGY_CHECK)
            if (
                not any(
                    (not listener.healthy and listener.wanted) or listener.lost
                    for listener in self._listeners.values()
                )
                and "" not in self._listeners
                and not self._topology_suspect
            ):
                continue
            self._topology_suspect = False
            try:
                await self._reroute()
            except Exception as exc:  # the next round tries again; a failover takes seconds
                # One warning per run of failures; the retries of a long one would flood.
                level = logging.DEBUG if self._refresh_failing else logging.WARNING
                log.log(level, "Redis Cluster topology refresh failed (%s); retrying", exc)
                self._refresh_failing = True
            else:
                self._refresh_failing = False

    async def _reroute(self) -> None:
        assert self._cluster is not None
        await self._cluster.nodes_manager.initialize()
        moving: dict[str, list[str]] = {}
        for name, listener in list(self._listeners.items()):
            lost = listener.lost
            listener.lost = set()
            for channel in list(listener.wanted):
                owner = self._owner(channel)
                if owner and (owner != name or channel in lost):
                    moving.setdefault(owner, []).append(channel)
        moved: list[str] = []
        for owner, channels in moving.items():
            for channel in channels:
                old = self._listeners.get(self._route.get(channel, ""))
                if old is not None:
                    await old.unsubscribe(channel)
                self._route[channel] = owner
            target = await self._listener_for(owner)
            for channel in channels:
                try:
                    await target.subscribe(channel)
                except BrokerUnavailable:
                    continue  # wanted there: its listener announces it when it connects
                moved.append(channel)
        # Listeners of nodes that hold nothing any more (a dead master's) are closed; not one
        # a `subscribe` has just routed a channel to and is still connecting.
        routed = set(self._route.values())
        for name, listener in list(self._listeners.items()):
            if not listener.wanted and name not in routed:
                del self._listeners[name]
                await listener.close()
        if moved:
            log.info("Redis Cluster topology changed; %d channels resubscribed", len(moved))
            self.announce(sorted(moved))

    # What the listeners hand over -----------------------------------------------------------

    def dispatch(self, channel: str, payload: bytes) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            newline = payload.index(b"\n")
            marker = payload[:1]
            if marker == b"m":
                space = payload.index(b" ", 1, newline)
                handler.on_publication(
                    Publication(
                        channel=channel,
                        epoch=payload[1:space].decode(),
                        offset=int(payload[space + 1 : newline]),
                        frame=payload[newline + 1 :],
                    )
                )
            elif marker == b"e":
                handler.on_event(channel, payload[newline + 1 :], None)
            elif marker == b"p":
                handler.on_presence(channel, payload[newline + 1 :])
            elif marker == b"x":
                handler.on_event(channel, payload[newline + 1 :], payload[1:newline].decode())
            else:
                log.warning("unknown payload on %s: %r", channel, payload[:32])
        except Exception:
            log.exception("broker handler failed on a message for %s", channel)

    def announce(self, channels: list[str]) -> None:
        handler = self._handler
        if handler is None:
            return
        try:
            handler.on_resubscribed(channels)
        except Exception:
            log.exception("broker handler failed on_resubscribed")

    # Commands ---------------------------------------------------------------------------

    async def publish(
        self,
        channel: str,
        *,
        kind: str,
        name_key: str,
        msg_id: str,
        fields: bytes,
        idempotency_key: str | None = None,
        durable: bool = False,
    ) -> PublishResult:
        if not fields.startswith(b"{"):
            raise ValueError("fields must be the bytes of a JSON object")
        if durable:
            await self._mark(channel)
        head = frame_head(kind, name_key, channel)
        keys = [self._key(channel, "meta"), self._key(channel, "stream")]
        if idempotency_key is not None:
            keys.append(self._key(channel, "idem:" + idempotency_key))
        args: list[bytes | str | int] = [
            head,
            fields,
            msg_id,
            self.history_window,
            max(1, int(self.idempotency_ttl * 1000)),
            self.pubsub_name(channel),
        ]
        tail = [
            "1" if durable else "0",
            self.max_unconfirmed,
            self._ttl_ms,
            self._publish_cmd,
            "1" if self._cluster_mode else "0",
        ]
        # Without a seed a fresh epoch rides along (no extra round trip on a new channel);
        # with one, a missing meta is reported and the seed asked only then.
        start = ("", 0) if self._seed is not None else (new_epoch(), 0)
        try:
            reply = await self._publish_script(keys=keys, args=[*args, *start, *tail])
            if reply[0] == 2:
                with _unavailable():
                    initial = await self._initial_position(channel)
                reply = await self._publish_script(
                    keys=keys, args=[*args, initial.epoch, initial.offset, *tail]
                )
        except _UNAVAILABLE as exc:
            # A lost reply is not "not published": the script may have run (or, on a Redis
            # that stalled, may run when it wakes), so its members may get the message.
            raise BrokerUnavailable(
                str(exc) or type(exc).__name__, maybe_sent=may_have_run(exc)
            ) from exc
        if reply[0] == 1:
            epoch, offset, first_id = reply[1].decode().split(" ", 2)
            return PublishResult(
                epoch=epoch,
                offset=int(offset),
                msg_id=first_id,
                frame=reply[2] or b"",
                duplicate=True,
            )
        epoch = reply[1].decode()
        offset = int(reply[2])
        return PublishResult(
            epoch=epoch,
            offset=offset,
            msg_id=msg_id,
            frame=build_frame(head, epoch, offset, fields),
        )

    async def publish_event(
        self,
        channel: str,
        frame: bytes,
        *,
        exclude_user: str | None = None,
        presence: bool = False,
    ) -> None:
        if presence:
            payload = b"p\n" + frame
        elif exclude_user is None:
            payload = b"e\n" + frame
        else:
            if "\n" in exclude_user:
                raise ValueError("exclude_user may not contain a newline")
            payload = b"x" + exclude_user.encode() + b"\n" + frame
        with _unavailable():
            if self._cluster is not None:
                await self._cluster.spublish(self.pubsub_name(channel), payload)
            else:
                await self._client.publish(self.pubsub_name(channel), payload)

    async def position(self, channel: str) -> Position:
        with _unavailable():
            meta = await self._client.hmget(self._key(channel, "meta"), ["e", "o"])
            epoch, offset = cast(list[bytes | None], meta)
            if epoch is None or offset is None:
                return await self._ensure(channel)
        return Position(epoch.decode(), int(offset))

    async def peek_position(self, channel: str) -> Position | None:
        with _unavailable():
            meta = await self._client.hmget(self._key(channel, "meta"), ["e", "o"])
        epoch, offset = cast(list[bytes | None], meta)
        if epoch is None or offset is None:
            return None
        return Position(epoch.decode(), int(offset))

    async def recent(self, channel: str, since: Position) -> list[Publication] | None:
        if since.offset < 0:
            return None
        keys = [self._key(channel, "meta"), self._key(channel, "stream")]
        args: list[str | int] = [since.epoch, since.offset, self.history_window]
        with _unavailable():
            reply = await self._recent_script(keys=keys, args=args)
            if not reply:
                await self._ensure(channel)
                reply = await self._recent_script(keys=keys, args=args)
        if len(reply) < 3:
            return None
        epoch = reply[0].decode()
        top = int(reply[1])
        entries = reply[2]
        # Prove completeness: exactly the offsets since+1 .. top, none missing, none extra.
        if len(entries) != top - since.offset:
            return None
        publications = []
        for expected, (entry_id, fields) in enumerate(entries, since.offset + 1):
            if entry_id != f"{expected}-0".encode():
                return None
            publications.append(Publication(channel, epoch, expected, fields[1]))
        return publications

    async def last_frame(self, channel: str) -> bytes | None:
        with _unavailable():
            reply = await self._client.xrevrange(self._key(channel, "stream"), count=1)
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], reply)
        if not entries:
            return None
        return entries[0][1].get(b"f")

    # The storage ledger -------------------------------------------------------------------

    async def _mark(self, channel: str) -> None:
        """Name the channel in the unconfirmed set before publishing to it (at most every
        `_MARK_REFRESH` seconds), so that the reconciler of any node finds it even if this
        node dies right after the publish."""
        now = time.monotonic()
        if now - self._marked.get(channel, -_MARK_REFRESH) < _MARK_REFRESH:
            return
        # Taken before the await, so that a burst into a new room marks it once, not once
        # per publisher; given back if the mark did not reach Redis.
        self._marked[channel] = now
        try:
            with _unavailable():
                await self._mark_script(keys=[self._unconfirmed_key(channel)], args=[channel])
        except BaseException:
            self._marked.pop(channel, None)
            raise
        if len(self._marked) > 100_000:  # forget channels not published to lately
            cutoff = now - _MARK_REFRESH
            self._marked = {c: t for c, t in self._marked.items() if t >= cutoff}

    async def unconfirmed(self, limit: int = 10_000) -> list[str]:
        with _unavailable():
            sets = await asyncio.gather(
                *(self._client.zrange(key, 0, limit - 1) for key in self._unconfirmed_keys())
            )
        names = [name.decode() for found in sets for name in cast(list[bytes], found)]
        return names[:limit]

    async def storage_mark(self, channel: str) -> StorageMark | None:
        with _unavailable():
            meta = await self._client.hmget(self._key(channel, "meta"), ["e", "o", "s"])
        epoch, offset, stored = cast(list[bytes | None], meta)
        if epoch is None or offset is None:
            return None
        return StorageMark(epoch.decode(), int(offset), int(stored or offset))

    async def window(self, channel: str, epoch: str, first: int, last: int) -> list[Publication]:
        if last < first:
            return []
        keys = [self._key(channel, "meta"), self._key(channel, "stream")]
        with _unavailable():
            entries = await self._window_script(keys=keys, args=[epoch, max(first, 0), last])
        publications = []
        for entry_id, fields in entries:
            offset = int(entry_id.split(b"-", 1)[0])
            publications.append(Publication(channel, epoch, offset, fields[1]))
        return publications

    async def confirm_stored(self, channel: str, epoch: str, offset: int) -> StorageMark | None:
        keys = [self._key(channel, "meta"), self._key(channel, "stream")]
        with _unavailable():
            reply = await self._confirm_script(
                keys=keys, args=[epoch, offset, self.history_window, self._ttl_ms]
            )
            if not reply:
                await self._unmark(channel)
                return None
            mark = StorageMark(reply[0].decode(), int(reply[1]), int(reply[2]))
            if mark.stored >= mark.top:
                await self._unmark(channel)
        return mark

    async def _unmark(self, channel: str) -> None:
        if self._cluster is None:
            await self._unmark_script(
                keys=[self._unconfirmed_key(channel), self._key(channel, "meta")],
                args=[channel, _UNMARK_IDLE],
            )
            return
        # On a cluster the set and the room live in different slots: read the room first.
        # Still safe: a publish after this read re-marked the room less than _UNMARK_IDLE
        # seconds ago (or its node marked it within _MARK_REFRESH), which the script sees.
        top, stored = cast(
            list[bytes | None], await self._client.hmget(self._key(channel, "meta"), ["o", "s"])
        )
        await self._unmark_script(
            keys=[self._unconfirmed_key(channel)],
            args=[channel, _UNMARK_IDLE, top or b"", stored or top or b""],
        )

    async def claim(self, channel: str, seconds: float) -> bool:
        with _unavailable():
            taken = await self._client.set(
                self._key(channel, "reconciling"),
                self.node_id or "node",
                px=max(1, int(seconds * 1000)),
                nx=True,
            )
        return bool(taken)

    async def _initial_position(self, channel: str) -> Position:
        seeded = await self._seed(channel) if self._seed is not None else None
        if seeded is None:
            return Position(new_epoch(), 0)
        return Position(check_epoch(seeded.epoch), seeded.offset)

    async def _ensure(self, channel: str) -> Position:
        initial = await self._initial_position(channel)
        keys = [self._key(channel, "meta"), self._key(channel, "stream")]
        reply = await self._ensure_script(
            keys=keys,
            args=[initial.epoch, initial.offset, self._ttl_ms, "1" if self._cluster_mode else "0"],
        )
        return Position(reply[0].decode(), int(reply[1]))
