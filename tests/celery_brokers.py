"""Celery brokers for tests (a pytest plugin that `conftest.py` loads): a queue of each test's own.

On Redis, in database 13 (not the 15 that other tests flush, nor the 14 of the cluster tests)
under a key prefix of its own; on RabbitMQ, in the default vhost. Either is deleted when the
test ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from loadtests.isolated import IsolatedBroker
from tests.services import RABBITMQ_URL, REDIS_URL, redis_db_url, require

CELERY_REDIS_DB = int(redis_db_url(13).rsplit("/", 1)[1])  # 13 on the first xdist worker
VISIBILITY_TIMEOUT = 5  # seconds before Redis hands a dead worker's batches to another


def redis_broker() -> IsolatedBroker:
    require(REDIS_URL, 6379, "Redis")
    return IsolatedBroker.on_redis(
        REDIS_URL,
        CELERY_REDIS_DB,
        "collab.test",
        visibility_timeout=VISIBILITY_TIMEOUT,
        unacked_restore_interval=1,
    )


def rabbitmq_broker(*, quorum: bool = False) -> IsolatedBroker:
    require(RABBITMQ_URL, 5672, "RabbitMQ")
    return IsolatedBroker.on_rabbitmq(RABBITMQ_URL, "collab.test", quorum=quorum)


BROKERS = [
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("rabbitmq", marks=pytest.mark.rabbitmq),
]


@pytest.fixture(params=BROKERS)
def celery_broker(request: pytest.FixtureRequest) -> Iterator[IsolatedBroker]:
    """Each test that uses it runs twice: with Redis and with RabbitMQ as the Celery broker."""
    broker = redis_broker() if request.param == "redis" else rabbitmq_broker()
    try:
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture
def redis_celery_broker() -> Iterator[IsolatedBroker]:
    broker = redis_broker()
    try:
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture
def rabbitmq_celery_broker() -> Iterator[IsolatedBroker]:
    broker = rabbitmq_broker()
    try:
        yield broker
    finally:
        broker.cleanup()


@pytest.fixture
def quorum_celery_broker() -> Iterator[IsolatedBroker]:
    """A RabbitMQ quorum queue (COLLAB_CELERY_QUEUE_TYPE=quorum): one replica on this node."""
    broker = rabbitmq_broker(quorum=True)
    try:
        yield broker
    finally:
        broker.cleanup()
