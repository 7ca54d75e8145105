from __future__ import annotations

import httpx

from tests.helpers import login, register, user_with_token


async def _make_admin(client: httpx.AsyncClient, settings_url: str, user_id: object) -> None:
    from sqlalchemy import update

    from persistence.database import create_engine, create_session_factory
    from persistence.models import User

    engine = create_engine(settings_url)
    try:
        async with create_session_factory(engine)() as session:
            await session.execute(update(User).where(User.id == user_id).values(role="admin"))
            await session.commit()
    finally:
        await engine.dispose()


async def test_list_users_is_paginated_and_for_admins(
    client: httpx.AsyncClient, database_url: str
) -> None:
    ann, _ = await user_with_token(client, "ann")
    await _make_admin(client, database_url, ann["id"])
    headers = await login(client, "ann")
    for name in ("bob", "cid", "dan"):
        await register(client, name)
    bob_headers = await login(client, "bob")
    assert (await client.get("/users", headers=bob_headers)).status_code == 403
    page = (await client.get("/users?limit=2&offset=1", headers=headers)).json()
    assert page["total"] == 4
    assert [u["username"] for u in page["items"]] == ["bob", "cid"]
    assert all("password" not in key for u in page["items"] for key in u)
    for query in ("limit=0", "limit=201", "offset=-1", "limit=abc"):
        assert (await client.get(f"/users?{query}", headers=headers)).status_code == 422
    assert (await client.get("/users")).status_code == 401


async def test_users_change_only_themselves(client: httpx.AsyncClient) -> None:
    ann, ann_headers = await user_with_token(client, "ann")
    bob, bob_headers = await user_with_token(client, "bob")
    response = await client.patch(
        f"/users/{ann['id']}", json={"display_name": "Ann A."}, headers=ann_headers
    )
    assert response.status_code == 200 and response.json()["display_name"] == "Ann A."
    assert (
        await client.patch(f"/users/{ann['id']}", json={"display_name": "x"}, headers=bob_headers)
    ).status_code == 403
    assert (await client.delete(f"/users/{ann['id']}", headers=bob_headers)).status_code == 403
    # Nobody promotes themselves.
    assert (
        await client.patch(f"/users/{bob['id']}", json={"role": "admin"}, headers=bob_headers)
    ).status_code == 403
    # A password change needs the current one, takes effect, and ends older tokens.
    change = {"password": "new password!"}
    response = await client.patch(f"/users/{bob['id']}", json=change, headers=bob_headers)
    assert response.status_code == 422
    wrong = {**change, "current_password": "not it at all"}
    response = await client.patch(f"/users/{bob['id']}", json=wrong, headers=bob_headers)
    assert response.status_code == 403
    right = {**change, "current_password": "correct horse"}
    response = await client.patch(f"/users/{bob['id']}", json=right, headers=bob_headers)
    assert response.status_code == 200
    assert (await client.get("/users/me", headers=bob_headers)).status_code == 401
    await login(client, "bob", "new password!")
    assert (await client.get("/users/999999", headers=ann_headers)).status_code == 404
    assert (await client.get("/users/0", headers=ann_headers)).status_code == 422
    assert (await client.get(f"/users/{2**40}", headers=ann_headers)).status_code == 422


async def test_admin_manages_anyone(client: httpx.AsyncClient, database_url: str) -> None:
    admin, _ = await user_with_token(client, "root")
    await _make_admin(client, database_url, admin["id"])
    admin_headers = await login(client, "root")
    bob, bob_headers = await user_with_token(client, "bob")
    response = await client.patch(
        f"/users/{bob['id']}", json={"role": "service"}, headers=admin_headers
    )
    assert response.status_code == 200 and response.json()["role"] == "service"
    # A token carries the role it was issued with: a new role ends the old tokens.
    assert (await client.get("/users/me", headers=bob_headers)).status_code == 401
    # An admin sets a password without knowing the old one (a reset), and may make accounts.
    reset = {"password": "reset by admin"}
    response = await client.patch(f"/users/{bob['id']}", json=reset, headers=admin_headers)
    assert response.status_code == 200
    await login(client, "bob", "reset by admin")
    made = await client.post(
        "/users",
        json={"username": "svc", "password": "long enough", "role": "service"},
        headers=admin_headers,
    )
    assert made.status_code == 201 and made.json()["role"] == "service"
    assert (await client.delete(f"/users/{bob['id']}", headers=admin_headers)).status_code == 204
    assert (await client.get(f"/users/{bob['id']}", headers=admin_headers)).status_code == 404
