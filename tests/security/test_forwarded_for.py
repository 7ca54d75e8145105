"""Issue 15, High: the sign-in rate limit could be dodged. NGINX appended the client's own
X-Forwarded-For, the server took the client's choice as its address, and 40 bad logins with a
changing header met no limit. Through the shipped NGINX template, on two nodes sharing Redis."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from tests.security.common import running_server
from tests.security.proxy import Proxy, nginx_in_front
from tests.services import REDIS_URL, redis_db_url, require

pytestmark = [pytest.mark.slow, pytest.mark.redis]

BURST = 5  # sign-in requests per address per node before 429; nothing refills during a test
PER_ACCOUNT = 4  # sign-in attempts per username without a success


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Proxy, list[str]]]:
    require(REDIS_URL, 6379, "Redis")
    import redis

    broker = redis_db_url(13)
    redis.Redis.from_url(broker).flushdb()
    extra = {
        "COLLAB_BROKER_URL": broker,
        "COLLAB_AUTH_RATE_LIMIT": "0.0001",
        "COLLAB_AUTH_RATE_BURST": str(BURST),
        "COLLAB_LOGIN_FAILURE_LIMIT": f"{PER_ACCOUNT} per hour",
    }
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(
                running_server(tmp_path, {**extra, "COLLAB_NODE_ID": f"hub{i}"}, f"hub{i}")
            )
            for i in (1, 2)
        ]
        proxy = stack.enter_context(nginx_in_front(tmp_path, [n.port for n in nodes]))
        yield proxy, [n.url for n in nodes]
    redis.Redis.from_url(broker).flushdb()


def test_a_spoofed_forwarded_for_does_not_dodge_the_address_limit(
    cluster: tuple[Proxy, list[str]],
) -> None:
    proxy, _ = cluster
    statuses = []
    with proxy.client() as http:
        for i in range(4 * BURST):
            response = http.post(
                "/auth/token",
                data={"username": f"nobody{i}", "password": "guess"},
                headers={"X-Forwarded-For": f"203.0.113.{i + 1}"},
            )
            statuses.append(response.status_code)
    assert set(statuses) <= {401, 429}, statuses
    # Two nodes, each with its own bucket for the one real address: at most 2 x BURST get in.
    assert statuses.count(401) <= 2 * BURST, statuses
    assert 429 in statuses


def test_sign_in_attempts_per_account_are_limited_across_nodes(
    cluster: tuple[Proxy, list[str]],
) -> None:
    _, nodes = cluster

    # Straight to the nodes, as the trusted proxy would: each attempt from another address,
    # alternating nodes, so only a count per account that both nodes share can stop them.
    def attempt(i: int, password: str) -> httpx.Response:
        return httpx.post(
            f"{nodes[i % 2]}/auth/token",
            data={"username": "alice", "password": password},
            headers={"X-Forwarded-For": f"198.51.100.{i + 1}"},
            timeout=10,
        )

    created = httpx.post(
        f"{nodes[0]}/auth/register",
        json={"username": "alice", "password": "correct horse"},
        headers={"X-Forwarded-For": "198.51.100.200"},
    )
    assert created.status_code == 201, created.text
    assert attempt(100, "correct horse").status_code == 200  # a success starts the count over
    statuses = [attempt(i, "wrong guess").status_code for i in range(PER_ACCOUNT + 3)]
    assert statuses[:PER_ACCOUNT] == [401] * PER_ACCOUNT
    assert statuses[PER_ACCOUNT:] == [429] * 3, statuses
    locked = attempt(99, "correct horse")
    assert locked.status_code == 429  # while locked, even the right password waits
    assert int(locked.headers["retry-after"]) >= 1
    assert "detail" in locked.json()
