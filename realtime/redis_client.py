"""The one way the realtime core opens Redis: commands that wait for a connection, not fail.

redis-py's asyncio pool (8.x) holds at most 100 connections by default and raises
`MaxConnectionsError` the moment a 101st command is in flight: a burst of publishes or a join
storm on a node with thousands of sockets would answer `unavailable` while Redis is idle. A
`BlockingConnectionPool` queues such commands for a free connection instead, for at most the
`POOL_WAIT` seconds: a burst of thousands of commands queues on a 2-core node for a second
or two (measured: 5,000 publishes at once), which is load, not an outage; a Redis that does
not answer at all still fails each command within the socket timeout.

Every command runs once (no retry: a blind retry of a script could publish twice), with the
same timeouts for connecting and reading.
"""

from __future__ import annotations

import re
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

# Connections per pool: enough to keep Redis busy from one node, few enough for many nodes.
MAX_CONNECTIONS = 128
POOL_WAIT = 10.0


def redis_client(url: str, *, timeout: float, client_name: str = "") -> aioredis.Redis:
    options: dict[str, Any] = {
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


def lua_script(name: str) -> str:
    """A Redis script of `realtime/lua/`: kept as files so they read (and lint) as Lua, as
    centrifuge keeps its `internal/redis_lua/*.lua`."""
    return resources.files("realtime").joinpath("lua", name).read_text(encoding="utf-8")
