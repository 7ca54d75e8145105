"""The user-connections interface: how many sockets a user holds across the whole cluster.

Each node caps a user's connections on itself (`Hub.user_connections`); that alone lets one
user hold the cap on every node. This counts them cluster-wide.

Implementations: `UserConnections` itself (one node: the node's own count is the whole
count, so it admits everything) and `user_connections_redis.RedisUserConnections`.

Contract:

- `claim` records one connection of a user unless the user already holds `limit` live ones;
  atomic, so two nodes admitting at once cannot both take the last place.
- Entries carry an expiry `ttl` seconds ahead; the owning node calls `refresh` for its live
  connections more often than that, so a dead node's connections stop counting within `ttl`
  without anyone cleaning up after it.
- `release` forgets one connection (the socket closed).
- While the backend is unreachable, calls raise `UserConnectionsUnavailable`; the node then
  admits on its own count alone (a Redis outage must not lock every user out).
"""

from __future__ import annotations

from collections.abc import Iterable


class UserConnectionsUnavailable(Exception):
    """The backend cannot be reached."""


class UserConnections:
    """One node: nothing to add to the node's own per-user count."""

    ttl: float = 30.0

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def claim(self, user_id: str, conn_id: str, limit: int) -> bool:
        """Record the connection; False (recording nothing) when the user holds `limit`."""
        return True

    async def release(self, user_id: str, conn_id: str) -> None:
        return None

    async def refresh(self, entries: Iterable[tuple[str, str]]) -> None:
        """Push the expiry of these (user_id, conn_id) live connections ahead."""
