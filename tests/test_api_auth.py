from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TypedDict

import httpx
import jwt
import pytest

from api.security import create_access_token
from collab.settings import Settings
from tests.conftest import TEST_SECRET
from tests.helpers import login, register, user_with_token


class TokenHolder(TypedDict):
    """The arguments of `create_access_token` naming whom a token is for, and for how long."""

    user_id: int
    name: str
    minutes: int


async def test_register_then_token_then_me(client: httpx.AsyncClient) -> None:
    user = await register(client, "ann")
    assert set(user) == {"id", "username", "display_name", "role", "is_guest", "created_at"}
    assert user["username"] == "ann" and user["display_name"] == "ann"
    assert user["role"] == "user" and user["is_guest"] is False
    headers = await login(client, "ann")
    me = await client.get("/users/me", headers=headers)
    assert me.status_code == 200
    assert me.json()["id"] == user["id"]


async def test_register_rejects_duplicates_and_bad_input(client: httpx.AsyncClient) -> None:
    await register(client, "ann")
    again = await client.post("/auth/register", json={"username": "ann", "password": "x" * 12})
    assert again.status_code == 409
    for body in (
        {"username": "a", "password": "long enough"},
        {"username": "ann ann", "password": "long enough"},
        {"username": "x" * 33, "password": "long enough"},
        {"username": "bob", "password": "short"},
        {"username": "bob", "password": "x" * 129},
        {"username": "bob", "password": "nul\x00character"},
        {"username": "bob"},
        {"username": "bob", "password": "long enough", "role": "admin"},
    ):
        response = await client.post("/auth/register", json=body)
        assert response.status_code == 422, body
        assert "detail" in response.json()


async def test_wrong_password_and_unknown_user_get_401(client: httpx.AsyncClient) -> None:
    await register(client, "ann")
    for username, password in (("ann", "wrong password"), ("nobody", "correct horse")):
        response = await client.post(
            "/auth/token", data={"username": username, "password": password}
        )
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Bearer not-a-jwt",
        "Basic YW5uOnB3",
        "Bearer eyJhbGciOiJub25lIn0.eyJzdWIiOiIxIn0.",
    ],
)
async def test_protected_routes_refuse_bad_tokens(
    client: httpx.AsyncClient, header: str | None
) -> None:
    headers = {"Authorization": header} if header else {}
    response = await client.get("/users/me", headers=headers)
    assert response.status_code == 401


async def test_expired_and_foreign_tokens_are_refused(client: httpx.AsyncClient) -> None:
    user = await register(client, "ann")
    user_id = int(str(user["id"]))
    issued = (await login(client, "ann"))["Authorization"].removeprefix("Bearer ")
    version = jwt.decode(issued, options={"verify_signature": False})["ver"]
    past = datetime.now(UTC) - timedelta(days=2)
    ann: TokenHolder = {"user_id": user_id, "name": "ann", "minutes": 60}
    expired = create_access_token(TEST_SECRET, **ann, role="user", version=version, now=past)
    foreign = create_access_token(
        "another-secret-" + "y" * 40, **ann, role="admin", version=version
    )
    stale = create_access_token(TEST_SECRET, **ann, role="user", version=version + 1)
    unversioned = jwt.encode(
        {**jwt.decode(issued, options={"verify_signature": False}), "ver": None},
        TEST_SECRET,
        algorithm="HS256",
    )
    fresh = create_access_token(TEST_SECRET, **ann, role="user", version=version)
    for token, status in (
        (expired, 401),
        (foreign, 401),
        (stale, 401),
        (unversioned, 401),
        (fresh, 200),
    ):
        response = await client.get("/users/me", headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == status


async def test_token_of_deleted_user_is_refused(client: httpx.AsyncClient) -> None:
    user, headers = await user_with_token(client, "ann")
    assert (await client.delete(f"/users/{user['id']}", headers=headers)).status_code == 204
    assert (await client.get("/users/me", headers=headers)).status_code == 401


async def test_guest_token(client: httpx.AsyncClient) -> None:
    response = await client.post("/auth/guest", json={"name": "  Visitor  "})
    assert response.status_code == 200
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["user"]["is_guest"] is True and body["user"]["display_name"] == "Visitor"
    me = await client.get("/users/me", headers={"Authorization": f"Bearer {body['access_token']}"})
    assert me.json()["id"] == body["user"]["id"]
    for bad in ({"name": ""}, {"name": "x" * 65}, {"name": "bell\x07"}, {}):
        assert (await client.post("/auth/guest", json=bad)).status_code == 422


async def test_guest_access_can_be_switched_off(database_url: str) -> None:
    from collab.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(database_url, guest_access=False))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            response = await http.post("/auth/guest", json={"name": "eve"})
    assert response.status_code == 403


def test_production_refuses_default_or_missing_secret() -> None:
    from pydantic import ValidationError

    for secret in (None, "changeme", "short-but-not-default"):
        with pytest.raises(ValidationError, match="COLLAB_SECRET_KEY"):
            Settings(env="production", secret_key=secret, allowed_origins=["https://a.example"])
    with pytest.raises(ValidationError, match="COLLAB_ALLOWED_ORIGINS"):
        Settings(env="production", secret_key="k" * 40, allowed_origins=["*"])
    ok = Settings(env="production", secret_key="k" * 40, allowed_origins=["https://a.example"])
    assert ok.secret == "k" * 40


def test_development_gets_a_random_secret_and_origins_parse_from_env(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("COLLAB_SECRET_KEY", raising=False)
    monkeypatch.setenv("COLLAB_ALLOWED_ORIGINS", "https://a.example, https://b.example")
    first, second = Settings(), Settings()
    assert len(first.secret) >= 32 and first.secret != second.secret
    assert first.allowed_origins == ["https://a.example", "https://b.example"]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("COLLAB_DATABASE_URL", "sqlite:///./sync-driver.db"),
        ("COLLAB_DATABASE_URL", "not a url"),
        ("COLLAB_BROKER_URL", "kafka://localhost"),
        ("COLLAB_RATE_LIMIT", "-1"),
        ("COLLAB_ENV", "staging"),
        ("COLLAB_LOGIN_FAILURE_LIMIT", "as many as you like"),
        ("COLLAB_PASSWORD_HASH_CONCURRENCY", "0"),
    ],
)
def test_cli_refuses_bad_configuration_with_a_clear_message(variable: str, value: str) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("COLLAB_")}
    env[variable] = value
    result = subprocess.run(
        [sys.executable, "-m", "collab", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "invalid configuration" in result.stderr
    assert "Traceback" not in result.stderr


async def test_credential_routes_are_rate_limited_per_address(database_url: str) -> None:
    from collab.app import create_app
    from tests.conftest import make_settings

    app = create_app(make_settings(database_url, auth_rate_limit=1, auth_rate_burst=3))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=("10.1.1.1", 1234))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            codes = [
                (await http.post("/auth/token", data={"username": "x", "password": "y"}))
                for _ in range(5)
            ]
            assert [r.status_code for r in codes] == [401, 401, 401, 429, 429]
            assert int(codes[-1].headers["retry-after"]) >= 1
            # Other routes are not limited by it.
            assert (await http.get("/healthz")).status_code == 200
        other = httpx.ASGITransport(app=app, client=("10.2.2.2", 1234))
        async with httpx.AsyncClient(transport=other, base_url="http://t") as http:
            assert (await http.post("/auth/guest", json={"name": "n"})).status_code == 200
