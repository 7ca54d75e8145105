"""A user's connections are capped across the cluster, not only per node (issue 15, Medium).

`COLLAB_MAX_CONNECTIONS_PER_USER` held per node only, so one user (or one client with a free
guest identity) held the cap on every node. With Redis, the nodes now count each user's
sockets together (`realtime.user_connections_redis`); entries expire unless their node keeps
refreshing them, so the sockets of a node that died stop counting within the presence timeout.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from tests.services import redis_db_url, require
from tests.test_cluster_e2e import forget_run_keys, start_nodes, stop_nodes
from tests.wsclient import Client, guest

pytestmark = [pytest.mark.slow, pytest.mark.redis]

CLUSTER_REDIS_URL = redis_db_url(13)


async def close_code(url: str) -> int | None:
    """The close code of a connection the server refuses, or None when it welcomes it."""
    async with connect(url, open_timeout=10) as ws:
        client = Client(ws)
        try:
            client.welcome = await client.next_frame()
        except Exception:
            return await client.closed_with()
        await ws.close()
        return None


async def test_the_cap_holds_across_nodes_and_a_dead_nodes_sockets_expire(
    tmp_path: Path, sqlite_template: Path
) -> None:
    require(CLUSTER_REDIS_URL, 6379, "Redis")
    nodes = start_nodes(
        tmp_path, sqlite_template, CLUSTER_REDIS_URL, ["a", "b"], max_connections_per_user="2"
    )
    try:
        a, b = nodes
        token, user_id = guest(a.url, "many")
        on_a = await Client.connect(a.ws_url, token)
        on_b = await Client.connect(b.ws_url, token, "/ws/live")
        # Each node holds one of this user's sockets, under its own cap of 2; the cluster is full.
        assert await close_code(f"{a.ws_url}/ws/chat?token={token}") == 4429
        assert await close_code(f"{b.ws_url}/ws/live?token={token}") == 4429
        # Another user is not affected.
        other, _ = guest(a.url, "other")
        assert await close_code(f"{b.ws_url}/ws/chat?token={other}") is None

        # A socket closed gives its place back (once its node has seen it go).
        await on_a.close()
        again = None
        for _ in range(100):
            try:
                again = await Client.connect(b.ws_url, token)
                break
            except ConnectionClosed as exc:
                refused = exc.rcvd.code if exc.rcvd else None
            assert refused == 4429
            await asyncio.sleep(0.05)
        assert again is not None, "a closed socket still counted"
        assert (await again.request({"type": "ping"}))["type"] == "pong"

        # Node b dies with the user's sockets: they stop counting once their entries expire
        # (presence timeout 2 s here), without anyone cleaning up after b.
        assert await close_code(f"{a.ws_url}/ws/chat?token={token}") == 4429
        b.kill()
        deadline = time.monotonic() + 30
        while await close_code(f"{a.ws_url}/ws/chat?token={token}") == 4429:
            assert time.monotonic() < deadline, "a dead node's socket counted for ever"
            await asyncio.sleep(0.2)
        del on_b
        # The count lives in Redis with an expiry: nothing is kept for ever.
        kept = await Client.connect(a.ws_url, token)
        client = redis.Redis.from_url(CLUSTER_REDIS_URL)
        assert 0 < client.pttl(f"collab:userconns:{{{user_id}}}") <= 10_000
        await kept.close()
    finally:
        stop_nodes(nodes)
        forget_run_keys(CLUSTER_REDIS_URL)
