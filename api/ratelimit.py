"""Per-client-address rate limits for the routes that cost the most to abuse.

Login attempts (password guessing; argon2 costs tens of milliseconds each) and guest
accounts (one row each) are limited per address; a client over its rate gets 429 with a
Retry-After. Buckets live in this process: each node limits on its own, which bounds abuse
per node without any shared state.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict

from fastapi import HTTPException, Request, status

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
