"""Issue 15, High: anyone could mint accounts without limit through `POST /users`, each one
an argon2 hash of 64 MiB, all at once. Against a real server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from tests.security.common import bearer, running_server

pytestmark = pytest.mark.slow


async def test_accounts_come_from_one_limited_path_and_hashing_is_bounded(
    tmp_path: Path,
) -> None:
    extra = {"COLLAB_PASSWORD_HASH_CONCURRENCY": "1", "COLLAB_PASSWORD_HASH_QUEUE": "1"}
    with running_server(tmp_path, extra) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            account = {"username": "mallory", "password": "correct horse"}
            # POST /users is for admins: a stranger or a guest gets nothing made.
            assert (await http.post("/users", json=account)).status_code == 401
            guest = (await http.post("/auth/guest", json={"name": "g"})).json()["access_token"]
            response = await http.post("/users", json=account, headers=bearer(guest))
            assert response.status_code == 403

            # A burst of sign-ups: one hash at a time and one waiting; the rest are told to
            # come back, none fails with a 500 and none is made beyond what was answered 201.
            responses = await asyncio.gather(
                *(
                    http.post(
                        "/auth/register",
                        json={"username": f"user{i}", "password": "correct horse"},
                    )
                    for i in range(32)
                )
            )
            statuses = [r.status_code for r in responses]
            assert set(statuses) <= {201, 503}, statuses
            busy = [r for r in responses if r.status_code == 503]
            assert busy, "32 parallel sign-ups with room for 2 were all hashed"
            assert all(int(r.headers["retry-after"]) >= 1 for r in busy)
            assert all("detail" in r.json() for r in busy)
