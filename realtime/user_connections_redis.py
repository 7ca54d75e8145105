"""Cluster-wide per-user connection counts in Redis (`realtime.user_connections`).

One sorted set per user, `collab:userconns:{<user id>}`: member = connection id, score = the
time (Redis's clock, milliseconds) after which the entry no longer counts. The key itself
expires `ttl` after its last write, so a user nobody refreshes leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import cast

import redis.asyncio as aioredis

from realtime.redis_client import UNAVAILABLE, AnyRedis, any_redis_client, is_cluster, lua_script
from realtime.user_connections import UserConnections, UserConnectionsUnavailable

__all__ = ["RedisUserConnections"]

log = logging.getLogger(__name__)

_SOCKET_TIMEOUT = 2.0
_PIPELINE_USERS = 500


# ARGV: conn_id, limit, ttl_ms. Returns 1 when recorded (or already there), 0 at the limit.
_CLAIM_LUA = lua_script("user_connections_claim.lua")

# ARGV: ttl_ms, conn_id...  Only entries that exist: a refresh racing a release must not
# bring a closed connection back.
_REFRESH_LUA = lua_script("user_connections_refresh.lua")


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except UNAVAILABLE as exc:
        raise UserConnectionsUnavailable(str(exc) or type(exc).__name__) from exc


def _key(user_id: str) -> str:
    return f"collab:userconns:{{{user_id}}}"


class RedisUserConnections(UserConnections):
    def __init__(self, url: str, *, ttl: float = 30.0) -> None:
        self.ttl = ttl
        self._client: AnyRedis = any_redis_client(url, timeout=_SOCKET_TIMEOUT)
        self._cluster = is_cluster(url)
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
                if self._cluster:  # a cluster pipeline cannot carry scripts
                    await asyncio.gather(
                        *(
                            self._refresh(keys=[_key(user_id)], args=[self._ttl_ms, *conn_ids])
                            for user_id, conn_ids in users[start : start + _PIPELINE_USERS]
                        )
                    )
                    continue
                single = cast(aioredis.Redis, self._client)
                async with single.pipeline(transaction=False) as pipe:
                    for user_id, conn_ids in users[start : start + _PIPELINE_USERS]:
                        await self._refresh(
                            keys=[_key(user_id)], args=[self._ttl_ms, *conn_ids], client=pipe
                        )
                    await pipe.execute()
