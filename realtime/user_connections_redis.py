"""Cluster-wide per-user connection counts in Redis (`realtime.user_connections`).

One sorted set per user, `collab:userconns:{<user id>}`: member = connection id, score = the
time (Redis's clock, milliseconds) after which the entry no longer counts. The key itself
expires `ttl` after its last write, so a user nobody refreshes leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from realtime.user_connections import UserConnections, UserConnectionsUnavailable

__all__ = ["RedisUserConnections"]

log = logging.getLogger(__name__)

_SOCKET_TIMEOUT = 2.0
_PIPELINE_USERS = 500

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# ARGV: conn_id, limit, ttl_ms. Returns 1 when recorded (or already there), 0 at the limit.
_CLAIM_LUA = (
    _NOW_MS
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if not redis.call('ZSCORE', KEYS[1], ARGV[1])
   and redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
"""
)

# ARGV: ttl_ms, conn_id...  Only entries that exist: a refresh racing a release must not
# bring a closed connection back.
_REFRESH_LUA = (
    _NOW_MS
    + """
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[1]), ARGV[i])
end
if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""
)


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise UserConnectionsUnavailable(str(exc) or type(exc).__name__) from exc


def _key(user_id: str) -> str:
    return f"collab:userconns:{{{user_id}}}"


class RedisUserConnections(UserConnections):
    def __init__(self, url: str, *, ttl: float = 30.0) -> None:
        self.ttl = ttl
        options: dict[str, Any] = {
            "socket_timeout": _SOCKET_TIMEOUT,
            "socket_connect_timeout": _SOCKET_TIMEOUT,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
        }
        self._client: aioredis.Redis = aioredis.Redis.from_url(url, **options)
        self._claim = self._client.register_script(_CLAIM_LUA)
        self._refresh = self._client.register_script(_REFRESH_LUA)

    @property
    def _ttl_ms(self) -> int:
        return max(1, int(self.ttl * 1000))

    async def close(self) -> None:
        await self._client.aclose()

    async def claim(self, user_id: str, conn_id: str, limit: int) -> bool:
        with _unavailable():
            recorded = await self._claim(keys=[_key(user_id)], args=[conn_id, limit, self._ttl_ms])
        return bool(recorded)

    async def release(self, user_id: str, conn_id: str) -> None:
        with _unavailable():
            await self._client.zrem(_key(user_id), conn_id)

    async def refresh(self, entries: Iterable[tuple[str, str]]) -> None:
        by_user: dict[str, list[str]] = {}
        for user_id, conn_id in entries:
            by_user.setdefault(user_id, []).append(conn_id)
        users = list(by_user.items())
        with _unavailable():
            for start in range(0, len(users), _PIPELINE_USERS):
                async with self._client.pipeline(transaction=False) as pipe:
                    for user_id, conn_ids in users[start : start + _PIPELINE_USERS]:
                        await self._refresh(
                            keys=[_key(user_id)], args=[self._ttl_ms, *conn_ids], client=pipe
                        )
                    await pipe.execute()
