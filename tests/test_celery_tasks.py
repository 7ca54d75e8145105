"""The batch task's work without Celery: decoding the JSON payload and writing to PostgreSQL.

The end-to-end tests (test_celery_worker.py) run it inside real workers; these pin down what
happens to a batch that is delivered twice, or that holds a message the database refuses or
that cannot be read: the rest of the batch is stored, once, and nothing is retried forever.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from persistence.celery_sink import encode_message
from realtime.protocol import utc_timestamp
from realtime.storage import StoredMessage
from realtime.types import UserInfo, new_msg_id
from tests.test_celery_worker import stored_rows
from workers.tasks import BatchNotStored, BatchWriter, decode_batch, store_batch

pytestmark = pytest.mark.postgres


def payload(room: str, offsets: range) -> list[dict[str, Any]]:
    return [
        encode_message(
            StoredMessage(
                msg_id=new_msg_id(),
                room=room,
                epoch="ep",
                offset=n,
                user=UserInfo("3", "cy"),
                body={"n": n, "text": "é ☃"},
                client_msg_id=None,
                ts=utc_timestamp(),
            )
        )
        for n in offsets
    ]


@pytest.fixture
def writer(postgres_database: str) -> Iterator[BatchWriter]:
    found = BatchWriter(postgres_database)
    try:
        yield found
    finally:
        found.close()


def rows_of(database_url: str, room: str) -> list[dict[str, Any]]:
    return sorted(asyncio.run(stored_rows(database_url, [room])), key=lambda r: r["offset"])


def test_a_batch_delivered_twice_is_stored_once(writer: BatchWriter) -> None:
    room = f"t-{uuid.uuid4().hex[:8]}"
    batch = payload(room, range(1, 301))
    assert store_batch(writer, batch) == 300
    assert store_batch(writer, batch) == 300  # written again, skipped by the database
    assert store_batch(writer, batch[100:150]) == 50
    rows = rows_of(writer.database_url, room)
    assert [(r["offset"], r["msg_id"]) for r in rows] == [(m["offset"], m["msg_id"]) for m in batch]
    assert rows[0]["body"] == batch[0]["body"]


def test_a_refused_or_unreadable_message_does_not_sink_its_batch(
    writer: BatchWriter, caplog: pytest.LogCaptureFixture
) -> None:
    room = f"t-{uuid.uuid4().hex[:8]}"
    store_batch(writer, payload(room, range(5, 6)))
    batch = payload(room, range(1, 11))  # offset 5 again, under another msg_id: refused
    broken = {**batch[2], "user": "not an object"}
    stored = store_batch(writer, [*batch[:2], broken, *batch[3:]])
    assert stored == 8  # 10, less the unreadable one and the refused one
    offsets = [r["offset"] for r in rows_of(writer.database_url, room)]
    assert offsets == [1, 2, 4, 5, 6, 7, 8, 9, 10]
    assert "cannot be read" in caplog.text
    assert "refused by the database" in caplog.text
    assert decode_batch([{"msg_id": "x"}]) == []


def test_an_unreachable_database_means_retry_not_loss() -> None:
    writer = BatchWriter("postgresql+asyncpg://postgres@127.0.0.1:1/nowhere")
    try:
        with pytest.raises(BatchNotStored):
            store_batch(writer, payload("t-unreachable", range(1, 4)))
    finally:
        writer.close()
