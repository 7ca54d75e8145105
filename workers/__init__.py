"""Celery workers: the app `collab worker` runs and the task that stores message batches.

Celery is imported only when an app is built, so this package imports without it.
"""

from workers.app import create_celery_app, create_worker_app

__all__ = ["create_celery_app", "create_worker_app"]
