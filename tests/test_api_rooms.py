from __future__ import annotations

from datetime import UTC, datetime

import httpx

from persistence.database import create_engine, create_session_factory
from persistence.repositories import MessageRepository, message_row
from tests.helpers import user_with_token


async def _store_messages(database_url: str, room: str, epoch: str, count: int) -> None:
    engine = create_engine(database_url)
    try:
        async with create_session_factory(engine)() as session:
            rows = [
                message_row(
                    msg_id=f"{room}-{epoch}-{n:04d}",
                    room=room,
                    epoch=epoch,
                    offset=n,
                    user_id="1",
                    user_name="ann",
                    body={"text": f"m{n}"},
                    client_msg_id=None,
                    created_at=datetime.now(UTC),
                )
                for n in range(1, count + 1)
            ]
            await MessageRepository(session).insert_many(rows)
            # A second delivery of the same batch writes nothing.
            assert await MessageRepository(session).insert_many(rows[:3]) == 0
            await session.commit()
    finally:
        await engine.dispose()


async def test_public_and_private_rooms(client: httpx.AsyncClient) -> None:
    ann, ann_h = await user_with_token(client, "ann")
    bob, bob_h = await user_with_token(client, "bob")
    _, eve_h = await user_with_token(client, "eve")
    public = await client.post("/rooms", json={"name": "general"}, headers=ann_h)
    assert public.status_code == 201
    assert set(public.json()) == {"name", "private", "created_at"}
    private = await client.post(
        "/rooms", json={"name": "team:core", "private": True, "members": [bob["id"]]}, headers=ann_h
    )
    assert private.status_code == 201 and private.json()["private"] is True

    assert (await client.post("/rooms", json={"name": "general"}, headers=bob_h)).status_code == 409
    for bad in (
        {"name": ""},
        {"name": "x" * 65},
        {"name": "has space"},
        {"name": "ünïcode"},
        {"name": "pub", "members": [bob["id"]]},
        {"name": "priv", "private": True, "members": [987654]},
    ):
        response = await client.post("/rooms", json=bad, headers=ann_h)
        assert response.status_code == 422, bad

    for headers, visible in ((ann_h, True), (bob_h, True), (eve_h, False)):
        names = [r["name"] for r in (await client.get("/rooms", headers=headers)).json()["items"]]
        assert ("team:core" in names) is visible
        assert "general" in names
        read = await client.get("/rooms/team:core", headers=headers)
        assert read.status_code == (200 if visible else 404)
        history = await client.get("/rooms/team:core/messages", headers=headers)
        assert history.status_code == (200 if visible else 404)
    assert ann["id"] != bob["id"]


async def test_history_pages_oldest_first(client: httpx.AsyncClient, database_url: str) -> None:
    _, headers = await user_with_token(client, "ann")
    await _store_messages(database_url, "general", "e1", 120)

    latest = (await client.get("/rooms/general/messages?limit=50", headers=headers)).json()
    assert [m["offset"] for m in latest["messages"]] == list(range(71, 121))
    assert latest["has_more"] is True
    first = latest["messages"][0]
    assert set(first) == {
        "type",
        "room",
        "epoch",
        "offset",
        "msg_id",
        "client_msg_id",
        "user",
        "body",
        "ts",
    }
    assert first["user"] == {"id": "1", "name": "ann"} and first["body"] == {"text": "m71"}
    assert first["ts"].endswith("Z")

    older = (await client.get("/rooms/general/messages?before=71&limit=50", headers=headers)).json()
    assert [m["offset"] for m in older["messages"]] == list(range(21, 71))
    oldest = (
        await client.get("/rooms/general/messages?before=21&limit=50", headers=headers)
    ).json()
    assert [m["offset"] for m in oldest["messages"]] == list(range(1, 21))
    assert oldest["has_more"] is False

    forward = (
        await client.get("/rooms/general/messages?after=100&limit=10", headers=headers)
    ).json()
    assert [m["offset"] for m in forward["messages"]] == list(range(101, 111))
    assert forward["has_more"] is True

    # A newer epoch (the broker lost its counters) becomes the default; the old one stays
    # readable by name.
    await _store_messages(database_url, "general", "e2", 3)
    newest = (await client.get("/rooms/general/messages", headers=headers)).json()
    assert [(m["epoch"], m["offset"]) for m in newest["messages"]] == [
        ("e2", 1),
        ("e2", 2),
        ("e2", 3),
    ]
    old = (await client.get("/rooms/general/messages?epoch=e1&limit=2", headers=headers)).json()
    assert [(m["epoch"], m["offset"]) for m in old["messages"]] == [("e1", 119), ("e1", 120)]

    empty = (await client.get("/rooms/never-used/messages", headers=headers)).json()
    assert empty == {"messages": [], "has_more": False}
    for query in ("limit=201", "limit=0", "before=-1", "after=x"):
        response = await client.get(f"/rooms/general/messages?{query}", headers=headers)
        assert response.status_code == 422
    assert (await client.get("/rooms/bad%20name/messages", headers=headers)).status_code == 422


async def test_health_endpoints(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    ready = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["checks"] == {"database": True, "broker": True, "persistence": True}
    metrics = await client.get("/metrics")
    assert metrics.status_code == 200
    assert (await client.get("/openapi.json")).json()["info"]["title"] == "Collab"


async def test_metrics_report_the_node(client: httpx.AsyncClient) -> None:
    text = (await client.get("/metrics")).text
    for name in ("collab_connections", "collab_messages_published_total", "collab_broker_up"):
        assert name in text
    assert "collab_broker_up 1.0" in text


async def test_insert_many_counts_only_new_rows(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        async with create_session_factory(engine)() as session:
            rows = [
                message_row(
                    msg_id=f"count-{n}",
                    room="count",
                    epoch="e",
                    offset=n,
                    user_id="1",
                    user_name="ann",
                    body={},
                    client_msg_id=None,
                    created_at=datetime.now(UTC),
                )
                for n in range(1, 6)
            ]
            repo = MessageRepository(session)
            assert await repo.insert_many(rows[:3]) == 3
            assert await repo.insert_many(rows) == 2
            await session.commit()
            assert await repo.count("count") == 5
    finally:
        await engine.dispose()
