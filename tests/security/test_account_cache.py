"""A WebSocket connect may rely on a remembered account (`api/accounts.py`), but never past
the moment its credentials stop holding: a password change or a deletion on any node refuses
the old token on every node's next connect at once, not after the memory's lifetime.

The lifetime is set to an hour here, so only forgetting can explain a refusal.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import pytest

from api.accounts import Account, AccountCache
from api.security import InvalidToken, VerifiedTokens, create_access_token
from tests.security.common import bearer, register_and_login, running_server, ws_outcome
from tests.services import redis_db_url, require
from tests.test_cluster_e2e import forget_run_keys, start_nodes, stop_nodes

CLUSTER_REDIS_URL = redis_db_url(13)
AN_HOUR = {"COLLAB_ACCOUNT_CACHE_SECONDS": "3600"}


@pytest.mark.slow
async def test_a_remembered_account_is_forgotten_when_its_tokens_end(tmp_path: Path) -> None:
    with running_server(tmp_path, AN_HOUR) as server, httpx.Client(base_url=server.url) as http:
        user_id, token = register_and_login(http, "carol")
        url = f"{server.ws_url}/ws/chat?token={token}"
        assert await ws_outcome(url) == "welcome"  # remembered from here on
        change = {"password": "another passphrase", "current_password": "correct horse"}
        assert (
            http.patch(f"/users/{user_id}", json=change, headers=bearer(token)).status_code == 200
        )
        assert await ws_outcome(url) == 4401

        guest = http.post("/auth/guest", json={"name": "dan"}).json()  # remembered at sign-in
        guest_url = f"{server.ws_url}/ws/chat?token={guest['access_token']}"
        assert await ws_outcome(guest_url) == "welcome"
        deleted = http.delete(
            f"/users/{guest['user']['id']}", headers=bearer(guest["access_token"])
        )
        assert deleted.status_code == 204
        assert await ws_outcome(guest_url) == 4401


@pytest.mark.slow
@pytest.mark.redis
async def test_every_node_forgets_an_account_changed_on_another(
    tmp_path: Path, sqlite_template: Path
) -> None:
    require(CLUSTER_REDIS_URL, 6379, "Redis")
    nodes = start_nodes(tmp_path, sqlite_template, CLUSTER_REDIS_URL, ["a", "b"], **{
        "account_cache_seconds": "3600"
    })  # fmt: skip
    try:
        a, b = nodes
        with httpx.Client(base_url=a.url) as http:
            user_id, token = register_and_login(http, "erin")
            on_b = f"{b.ws_url}/ws/chat?token={token}"
            assert await ws_outcome(on_b) == "welcome"  # b remembers erin
            change = {"password": "another passphrase", "current_password": "correct horse"}
            changed = http.patch(f"/users/{user_id}", json=change, headers=bearer(token))
            assert changed.status_code == 200
        assert await ws_outcome(on_b) == 4401
    finally:
        stop_nodes(nodes)
        forget_run_keys(CLUSTER_REDIS_URL)


async def test_the_memory_never_answers_for_another_version_or_after_forget() -> None:
    now = [0.0]
    cache = AccountCache(ttl=10, clock=lambda: now[0])
    reads: list[int] = []

    def loader(account: Account | None) -> Callable[[], Awaitable[Account | None]]:
        async def load() -> Account | None:
            reads.append(1)
            return account

        return load

    carol = Account(id=1, version=7, name="carol", role="user")
    assert await cache.holder(1, 7, loader(carol)) == carol
    assert await cache.holder(1, 7, loader(None)) == carol  # remembered: no read
    assert len(reads) == 1
    # A token of another version is looked up again, never refused or admitted from memory.
    moved = Account(id=1, version=8, name="carol", role="admin")
    assert await cache.holder(1, 8, loader(moved)) == moved
    assert await cache.holder(1, 7, loader(moved)) is None
    cache.forget(1)
    assert await cache.holder(1, 8, loader(None)) is None  # deleted
    now[0] = 100.0
    cache.remember(carol)
    now[0] = 111.0  # past its lifetime
    assert await cache.holder(1, 7, loader(None)) is None


def test_what_has_expired_is_not_kept() -> None:
    """A crowd of guests each signs in once: the memory holds the ones of the last `ttl`
    seconds, not every account it ever saw (up to its bound)."""
    now = [0.0]
    cache = AccountCache(ttl=10, clock=lambda: now[0])
    for user_id in range(1, 1001):
        now[0] = user_id / 10  # ten sign-ins a second, for a hundred seconds
        cache.remember(Account(id=user_id, version=1, name=f"guest-{user_id}", role="user"))
    assert sorted(cache._entries) == list(range(901, 1001))  # the last ten seconds' worth
    now[0] = 115.0
    cache.remember(Account(id=5000, version=1, name="late", role="user"))
    assert sorted(cache._entries) == [5000]
    # One stored again moves to the end, and lives a ttl from then.
    now[0] = 120.0
    cache.remember(Account(id=6000, version=1, name="other", role="user"))
    cache.remember(Account(id=5000, version=1, name="late", role="user"))
    now[0] = 126.0
    cache.remember(Account(id=7000, version=1, name="new", role="user"))
    assert list(cache._entries) == [6000, 5000, 7000]


async def test_a_lookup_under_way_when_the_account_is_forgotten_stores_nothing() -> None:
    cache = AccountCache(ttl=10)
    old = Account(id=2, version=1, name="old", role="user")

    async def load_then_forgotten() -> Account | None:
        cache.forget(2)  # the password changed while the row was being read
        return old

    assert await cache.holder(2, 1, load_then_forgotten) == old  # this connect raced it
    reads: list[int] = []

    async def load_deleted() -> Account | None:
        reads.append(1)
        return None

    assert await cache.holder(2, 1, load_deleted) is None  # nothing was stored
    assert reads == [1]


def test_a_verified_token_is_trusted_again_only_until_it_expires() -> None:
    secret = "s" * 40
    now = [time.time()]
    tokens = VerifiedTokens(secret, max_entries=2, clock=lambda: now[0])

    def token(key: str = secret) -> str:
        return create_access_token(key, user_id=1, name="a", role="user", version=1, minutes=1)

    good = token()
    assert tokens.decode(good).user_id == 1
    assert tokens.decode(good).user_id == 1  # from memory
    with pytest.raises(InvalidToken):  # another key's signature is checked, not remembered
        tokens.decode(token("t" * 40))
    with pytest.raises(InvalidToken):
        tokens.decode(good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1])
    now[0] += 61  # past its expiry: remembered, but refused
    with pytest.raises(InvalidToken):
        tokens.decode(good)
