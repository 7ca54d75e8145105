from __future__ import annotations

import asyncio

import httpx

from tests.helpers import user_with_token


async def test_item_crud_and_owner_checks(client: httpx.AsyncClient) -> None:
    ann, ann_h = await user_with_token(client, "ann")
    _, bob_h = await user_with_token(client, "bob")
    created = await client.post(
        "/items", json={"title": "Plan", "data": {"steps": [1, 2]}}, headers=ann_h
    )
    assert created.status_code == 201
    item = created.json()
    assert set(item) == {"id", "owner_id", "title", "data", "version", "created_at", "updated_at"}
    assert item["owner_id"] == ann["id"] and item["version"] == 1
    assert item["data"] == {"steps": [1, 2]}

    assert (await client.get(f"/items/{item['id']}", headers=bob_h)).json() == item
    denied = await client.patch(
        f"/items/{item['id']}", json={"version": 1, "title": "mine"}, headers=bob_h
    )
    assert denied.status_code == 403
    assert (await client.delete(f"/items/{item['id']}", headers=bob_h)).status_code == 403

    updated = await client.patch(
        f"/items/{item['id']}", json={"version": 1, "title": "Plan B"}, headers=ann_h
    )
    assert updated.status_code == 200
    assert updated.json()["title"] == "Plan B" and updated.json()["version"] == 2
    assert updated.json()["data"] == {"steps": [1, 2]}  # partial: data untouched

    assert (await client.delete(f"/items/{item['id']}", headers=ann_h)).status_code == 204
    assert (await client.get(f"/items/{item['id']}", headers=ann_h)).status_code == 404


async def test_stale_version_gets_409(client: httpx.AsyncClient) -> None:
    _, headers = await user_with_token(client, "ann")
    item = (await client.post("/items", json={"title": "t"}, headers=headers)).json()
    first = await client.patch(
        f"/items/{item['id']}", json={"version": 1, "data": {"a": 1}}, headers=headers
    )
    assert first.status_code == 200
    stale = await client.patch(
        f"/items/{item['id']}", json={"version": 1, "data": {"a": 2}}, headers=headers
    )
    assert stale.status_code == 409
    assert "version 2" in stale.json()["detail"]
    assert (await client.get(f"/items/{item['id']}", headers=headers)).json()["data"] == {"a": 1}
    assert (
        await client.delete(f"/items/{item['id']}?version=1", headers=headers)
    ).status_code == 409


async def test_concurrent_updates_from_one_version_one_wins(client: httpx.AsyncClient) -> None:
    _, headers = await user_with_token(client, "ann")
    item = (await client.post("/items", json={"title": "t"}, headers=headers)).json()
    responses = await asyncio.gather(
        *(
            client.patch(
                f"/items/{item['id']}", json={"version": 1, "title": f"v{n}"}, headers=headers
            )
            for n in range(5)
        )
    )
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) == 1 and codes.count(409) == 4
    final = (await client.get(f"/items/{item['id']}", headers=headers)).json()
    assert final["version"] == 2


async def test_item_listing_and_validation(client: httpx.AsyncClient) -> None:
    ann, headers = await user_with_token(client, "ann")
    _, bob_h = await user_with_token(client, "bob")
    for n in range(3):
        await client.post("/items", json={"title": f"a{n}"}, headers=headers)
    await client.post("/items", json={"title": "b"}, headers=bob_h)
    everything = (await client.get("/items?limit=200", headers=headers)).json()
    assert everything["total"] == 4
    mine = (await client.get(f"/items?owner_id={ann['id']}&limit=2", headers=headers)).json()
    assert mine["total"] == 3 and [i["title"] for i in mine["items"]] == ["a0", "a1"]
    deep: dict[str, object] = {}
    cursor = deep
    for _ in range(300):
        cursor["x"] = {}
        cursor = cursor["x"]  # type: ignore[assignment]
    for body in (
        {"title": ""},
        {"title": "x" * 201},
        {"title": "t", "data": [1]},
        {"title": "t", "data": {"big": "x" * 70_000}},
        {"title": "t", "data": {"nul": "a\x00b"}},
        {"title": "t", "data": deep},
        {"title": "t", "owner_id": 5},
    ):
        response = await client.post("/items", json=body, headers=headers)
        assert response.status_code == 422, body
    assert (await client.post("/items", json={"title": "t"})).status_code == 401
