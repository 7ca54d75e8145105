"""Rate limits for the routes that cost the most to abuse.

Per client address (`AddressLimiter`): login attempts (argon2 costs tens of milliseconds and
64 MiB each), registrations and guest accounts (one row each); a client over its rate gets
429 with a Retry-After. These buckets live in this process: each node limits on its own,
which bounds the load on a node without shared state. The address is the one the server
trusts: the peer's, or the proxy's X-Forwarded-For when the peer is the proxy (see SECURITY.md).

Per username (`LoginFailureLimiter`): sign-in attempts on one account, shared by every node
(Redis when the broker is Redis), so password guessing spread over many addresses and nodes
still meets a limit. A successful sign-in clears the account's count.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from typing import Any

import limits
from fastapi import HTTPException, Request, status
from limits.aio.storage import MemoryStorage, RedisStorage, Storage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.errors import StorageError

from realtime.backends import backend_kind, is_shared
from realtime.redis_tls import split_tls

MAX_TRACKED = 10_000


class AddressLimiter:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        # address -> (tokens, last refill); least recently seen first, so the oldest go.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def check(self, address: str) -> float:
        """0 when allowed now, else the seconds until the next request would be."""
        now = time.monotonic()
        tokens, stamp = self._buckets.pop(address, (self.burst, now))
        tokens = min(self.burst, tokens + (now - stamp) * self.rate)
        wait = 0.0
        if tokens >= 1.0:
            tokens -= 1.0
        else:
            wait = (1.0 - tokens) / self.rate
        self._buckets[address] = (tokens, now)
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        return wait

    def __call__(self, request: Request) -> None:
        address = request.client.host if request.client else "unknown"
        wait = self.check(address)
        if wait > 0:
            raise HTTPException(
                status.HTTP_429_TOO_MANY_REQUESTS,
                "Too many requests; slow down",
                headers={"Retry-After": str(max(1, math.ceil(wait)))},
            )


def _limits_uri(redis_url: str) -> str:
    scheme, _, rest = redis_url.partition("://")
    return f"async+redis+unix://{rest}" if scheme == "unix" else f"async+{scheme}://{rest}"


class LoginFailureLimiter:
    """At most `limit` sign-in attempts per username without a success in between.

    Every attempt is counted before the password is checked (one atomic step in Redis), so
    parallel guesses cannot all slip in before the first failure is recorded; a success
    clears the count. The cost, stated in SECURITY.md: a stranger can keep an account's
    sign-in locked by failing on purpose; its existing tokens keep working.
    """

    NAMESPACE = "collab-login"

    def __init__(self, limit: str, broker_url: str) -> None:
        """Counts in Redis when `broker_url` is Redis (every node shares them), else here."""
        self.limit = limits.parse(limit)
        self._pool: Any = None
        self.storage: Storage
        self._cluster: Any = None
        if backend_kind(broker_url) == "redis_cluster":
            from limits.aio.storage import RedisClusterStorage

            url, tls = split_tls(broker_url)
            scheme, _, rest = url.partition("://")
            cluster_storage = RedisClusterStorage(
                f"async+redis+cluster://{rest}",
                wrap_exceptions=True,
                implementation="redispy",
                key_prefix="collab",
                socket_timeout=5,
                socket_connect_timeout=5,
                ssl=scheme == "rediss+cluster",
                **tls,
            )
            bridge: Any = cluster_storage.bridge  # limits' redis-py bridge, untyped
            self._cluster = bridge.storage  # its redis-py cluster client, closed with us
            self.storage = cluster_storage
        elif is_shared(broker_url):
            import redis.asyncio as redis

            # Our own pool, so the connections close with the app, and a hung Redis answers
            # 503 within seconds instead of holding sign-ins.
            # Blocking: a crowd signing in at once waits for a connection rather than failing.
            url, tls = split_tls(broker_url)
            self._pool = redis.BlockingConnectionPool.from_url(
                url,
                **tls,
                socket_timeout=5,
                socket_connect_timeout=5,
                max_connections=64,
                timeout=5,
            )
            self.storage = RedisStorage(
                _limits_uri(url),
                wrap_exceptions=True,
                implementation="redispy",
                key_prefix="collab",
                connection_pool=self._pool,
            )
        else:
            self.storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(self.storage)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.disconnect()
        if self._cluster is not None:
            await self._cluster.aclose()

    @staticmethod
    def _key(username: str) -> str:
        return username[:65]  # longer names never match an account; bound the key anyway

    async def attempt(self, username: str) -> None:
        """Count one attempt; 429 with Retry-After when the account is over its limit."""
        key = self._key(username)
        try:
            if await self._limiter.hit(self.limit, self.NAMESPACE, key):
                return
            stats = await self._limiter.get_window_stats(self.limit, self.NAMESPACE, key)
        except StorageError:
            raise _unavailable() from None
        wait = max(1, math.ceil(stats.reset_time - time.time()))
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            "Too many sign-in attempts for this account; try again later",
            headers={"Retry-After": str(wait)},
        )

    async def succeeded(self, username: str) -> None:
        try:
            await self._limiter.clear(self.limit, self.NAMESPACE, self._key(username))
        except StorageError:
            raise _unavailable() from None


def _unavailable() -> HTTPException:
    # Without the shared count, letting the attempt through would lift the limit for as
    # long as the store is down.
    return HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "Sign-in is unavailable for a moment; try again shortly",
        headers={"Retry-After": "5"},
    )
