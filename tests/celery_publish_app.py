"""A Celery app whose task publishes to a room, as docs/CLIENTS.md shows: for the test that a
real worker's task reaches a browser-less client (`tests/test_service_publish.py`).

The worker runs it with the servers' settings in its environment (`COLLAB_*`) and takes its
own broker from `TEST_CELERY_BROKER_URL`.
"""

from __future__ import annotations

import os

from celery import Celery

from collab.publisher import publish_sync
from collab.settings import Settings

QUEUE = "collab.test.publish"

app = Celery("collab-publish-test", broker=os.environ.get("TEST_CELERY_BROKER_URL", "memory://"))
app.conf.task_default_queue = QUEUE
app.conf.broker_connection_retry_on_startup = True


@app.task(name="tests.announce")  # type: ignore[untyped-decorator]
def announce(room: str, text: str, client_msg_id: str) -> int:
    # The same client_msg_id on every retry of the task: the room gets the message once.
    published = publish_sync(
        Settings(), room, {"text": text}, client_msg_id=client_msg_id, name="celery"
    )
    return published.offset
