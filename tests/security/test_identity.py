"""Issue 15, High: a deleted user's token signed in as the next new user (SQLite reused the
id), and a token outlived a password change. Against a real server on each database."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.security.common import bearer, register_and_login, running_server, ws_outcome

pytestmark = pytest.mark.slow


async def test_a_token_names_one_account_and_dies_with_its_password(
    tmp_path: Path, database_url: str
) -> None:
    extra = {"COLLAB_DATABASE_URL": database_url, "COLLAB_AUTO_MIGRATE": "false"}
    with running_server(tmp_path, extra) as server, httpx.Client(base_url=server.url) as http:
        alice_id, alice_token = register_and_login(http, "alice")
        deleted = http.delete(f"/users/{alice_id}", headers=bearer(alice_token))
        assert deleted.status_code == 204
        bob_id, bob_token = register_and_login(http, "bob")

        # A new account never takes a deleted one's id, and the old token is nobody's now.
        assert bob_id != alice_id
        assert http.get("/users/me", headers=bearer(alice_token)).status_code == 401
        assert await ws_outcome(f"{server.ws_url}/ws/chat?token={alice_token}") == 4401

        # Changing a password needs the current one...
        change = {"password": "a new passphrase"}
        me = f"/users/{bob_id}"
        assert http.patch(me, json=change, headers=bearer(bob_token)).status_code == 422
        wrong = {**change, "current_password": "not the password"}
        assert http.patch(me, json=wrong, headers=bearer(bob_token)).status_code == 403
        right = {**change, "current_password": "correct horse"}
        assert http.patch(me, json=right, headers=bearer(bob_token)).status_code == 200

        # ...and ends every token issued before it, on REST and on WebSocket connect.
        assert http.get("/users/me", headers=bearer(bob_token)).status_code == 401
        assert await ws_outcome(f"{server.ws_url}/ws/chat?token={bob_token}") == 4401
        fresh = http.post("/auth/token", data={"username": "bob", "password": "a new passphrase"})
        assert fresh.status_code == 200
        token = fresh.json()["access_token"]
        assert http.get("/users/me", headers=bearer(token)).json()["id"] == bob_id
        assert await ws_outcome(f"{server.ws_url}/ws/chat?token={token}") == "welcome"
