"""The one way the realtime core opens Redis: commands that wait for a connection, not fail.

redis-py's asyncio pool (8.x) holds at most 100 connections by default and raises
`MaxConnectionsError` the moment a 101st command is in flight: a burst of publishes or a join
storm on a node with thousands of sockets would answer `unavailable` while Redis is idle. A
`BlockingConnectionPool` queues such commands for a free connection instead, for at most the
`POOL_WAIT` seconds: a burst of thousands of commands queues on a 2-core node for a second
or two (measured: 5,000 publishes at once), which is load, not an outage; a Redis that does
not answer at all still fails each command within the socket timeout.

Every command runs once (no retry: a blind retry of a script could publish twice), with the
same timeouts for connecting and reading. The one exception is on a cluster, a connection
refused outright: the command was not sent, so it goes once more on the refreshed slot map.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import re
from importlib import resources
from typing import Any
from urllib.parse import unquote, urlsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    ClusterDownError,
    RedisClusterException,
    SlotNotCoveredError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from realtime.redis_tls import split_tls

log = logging.getLogger(__name__)

# A Redis, or a Redis Cluster: the commands the backends use exist on both.
AnyRedis = aioredis.Redis | RedisCluster

# What "Redis cannot be reached" looks like: a lost or slow connection, and on a cluster a
# shard without a master (failover under way), a slot in migration, or no node answering at
# all (redis-py's RedisClusterException "cannot be connected", which is not a RedisError;
# it also covers a command it cannot route, which our fixed key layout never sends).
UNAVAILABLE: tuple[type[Exception], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    ClusterDownError,
    SlotNotCoveredError,
    TryAgainError,
    RedisClusterException,
)

CLUSTER_SCHEMES = frozenset({"redis+cluster", "rediss+cluster"})

# Connections per pool: enough to keep Redis busy from one node, few enough for many nodes.
MAX_CONNECTIONS = 128
POOL_WAIT = 10.0


def redis_client(url: str, *, timeout: float, client_name: str = "") -> aioredis.Redis:
    url, tls = split_tls(url)
    options: dict[str, Any] = {
        **tls,
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
    }
    if client_name:
        options["client_name"] = re.sub(r"[^!-~]", "_", client_name)
    pool = aioredis.BlockingConnectionPool.from_url(
        url, max_connections=MAX_CONNECTIONS, timeout=POOL_WAIT, **options
    )
    return aioredis.Redis.from_pool(pool)  # the client owns the pool: aclose() closes both


def is_cluster(url: str) -> bool:
    return url.split("://", 1)[0] in CLUSTER_SCHEMES


def cluster_seeds(url: str) -> list[tuple[str, int]]:
    """`redis+cluster://[user:pass@]host:port[,host:port...]`: the nodes to discover from."""
    netloc = urlsplit(url).netloc.rpartition("@")[2]
    seeds = []
    for part in netloc.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"not host:port in a Redis Cluster URL: {part!r}")
        seeds.append((host.strip("[]"), int(port)))
    return seeds


class NoConnectionFree(RedisConnectionError):
    """A command that waited `POOL_WAIT` for a connection and was never sent."""


class QueuedRedisCluster(RedisCluster):
    """A cluster client whose commands wait for a free connection, as the single-Redis pool
    does (module docstring): redis-py's cluster keeps up to `max_connections` per node and
    raises `MaxConnectionsError` past that. At most that many commands are in flight in all,
    so no node's pool can run out; the rest queue, for at most `POOL_WAIT` seconds."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._in_flight = asyncio.Semaphore(int(kwargs.get("max_connections", MAX_CONNECTIONS)))

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            await asyncio.wait_for(self._in_flight.acquire(), POOL_WAIT)
        except TimeoutError:
            raise NoConnectionFree("no Redis Cluster connection free in time") from None
        try:
            try:
                return await super().execute_command(*args, **kwargs)
            except RedisConnectionError as exc:
                if not never_sent(exc):
                    raise
                log.info("Redis Cluster: %s; the command goes again on a refreshed slot map", exc)
                # Refused before a byte was written: the command ran nowhere, so sending it
                # once more is no retry of a write. The error asked for a slot-map refresh,
                # which this second try runs first: after a failover it reaches the promoted
                # replica, where every client of a node otherwise failed one command each.
                return await super().execute_command(*args, **kwargs)
        finally:
            self._in_flight.release()


# A connect that failed with one of these never carried a command (redis-py keeps the
# socket's OSError as the ConnectionError's cause).
_NEVER_CONNECTED = frozenset({errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})


def never_sent(error: BaseException) -> bool:
    """Whether `error` is a connection that could not be opened at all, so that nothing of
    the command was sent (unlike a reset or a timeout, after which it may have run)."""
    cause = error.__cause__
    return isinstance(cause, OSError) and cause.errno in _NEVER_CONNECTED


def may_have_run(error: BaseException) -> bool:
    """Whether the command that failed with `error` may have run on Redis all the same: it
    was written, and the reply was lost (a dropped connection, or a Redis that stalled past
    the read timeout: a stalled Redis runs it when it wakes). A refusal by the cluster
    (CLUSTERDOWN, TRYAGAIN, no node for the slot) or a connection never opened is not."""
    return (
        isinstance(error, (RedisConnectionError, RedisTimeoutError))
        and not isinstance(error, NoConnectionFree)
        and not never_sent(error)
    )


def redis_cluster_client(url: str, *, timeout: float, client_name: str = "") -> RedisCluster:
    """A Redis Cluster client: follows MOVED and ASK (a redirection means the command did not
    run, so following it is no retry) and refreshes its slot map after a connection error,
    but never runs a command twice after a connection error: only a connection refused
    outright (nothing sent) is tried once more, on the refreshed map."""
    url, tls = split_tls(url)
    parts = urlsplit(url)
    options: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
        "protocol": 2,
        "max_connections": MAX_CONNECTIONS,
        "ssl": parts.scheme == "rediss+cluster",
        **tls,
    }
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    if client_name:
        options["client_name"] = re.sub(r"[^!-~]", "_", client_name)
    nodes = [ClusterNode(host, port) for host, port in cluster_seeds(url)]
    return QueuedRedisCluster(startup_nodes=nodes, **options)


def any_redis_client(url: str, *, timeout: float, client_name: str = "") -> AnyRedis:
    if is_cluster(url):
        return redis_cluster_client(url, timeout=timeout, client_name=client_name)
    return redis_client(url, timeout=timeout, client_name=client_name)


def lua_script(name: str) -> str:
    """A Redis script of `realtime/lua/`: kept as files so they read (and lint) as Lua, as
    centrifuge keeps its `internal/redis_lua/*.lua`."""
    return resources.files("realtime").joinpath("lua", name).read_text(encoding="utf-8")
