"""What a worker measures: how large its batches are and how long messages wait to be stored.

The histograms are always recorded. With COLLAB_CELERY_METRICS_PORT set, the worker's main
process serves them for Prometheus; the tasks run in pool processes, so the values live in
prometheus-client's multiprocess files (PROMETHEUS_MULTIPROC_DIR, a fresh temporary folder
unless the operator names one) and the main process adds them up at scrape time.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Histogram

log = logging.getLogger("collab.workers")

BATCH_SIZE_BUCKETS = (1, 2, 5, 10, 25, 50, 100, 200, 300, 500, 1000, 2000, 5000)
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
SUMMARY_EVERY = 10.0  # seconds between a process's "stored N messages" log lines


@dataclass
class WorkerMetrics:
    """The worker's instruments. Created after `setup_metrics` has chosen where values live."""

    batch_size: Histogram
    lag: Histogram
    stored: Counter
    rejected: Counter
    retries: Counter
    _since_summary: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls) -> WorkerMetrics:
        # registry=None: the multiprocess collector reads these from files; nothing else exports
        # them, and the default registry stays as other code expects it.
        return cls(
            batch_size=Histogram(
                "collab_persist_batch_size",
                "Messages per batch a worker stored",
                buckets=BATCH_SIZE_BUCKETS,
                registry=None,
            ),
            lag=Histogram(
                "collab_persist_lag_seconds",
                "From a message's acceptance by a node to its row being committed",
                buckets=LAG_BUCKETS,
                registry=None,
            ),
            stored=Counter(
                "collab_persist_messages",
                "Messages written (new, or already stored by an earlier delivery)",
                registry=None,
            ),
            rejected=Counter(
                "collab_persist_rejected_messages",
                "Messages the database refused as invalid (each one logged)",
                registry=None,
            ),
            retries=Counter(
                "collab_persist_retries",
                "Batches put back for a later try because the database was unreachable",
                registry=None,
            ),
        )

    def batch_stored(self, size: int, lags: list[float]) -> None:
        self.batch_size.observe(size)
        for lag in lags:
            self.lag.observe(lag)
        self.stored.inc(size)
        self._log_summary(size, max(lags, default=0.0))

    def _log_summary(self, size: int, max_lag: float) -> None:
        now = time.monotonic()
        with self._lock:
            totals = self._since_summary
            totals["messages"] = totals.get("messages", 0.0) + size
            totals["batches"] = totals.get("batches", 0.0) + 1
            totals["max_lag"] = max(totals.get("max_lag", 0.0), max_lag)
            started = totals.setdefault("started", now)
            if now - started < SUMMARY_EVERY:
                return
            self._since_summary = {"started": now}
        log.info(
            "stored %d messages in %d batches over %.0fs (longest wait %.3fs)",
            totals["messages"],
            totals["batches"],
            now - started,
            totals["max_lag"],
        )


_metrics: WorkerMetrics | None = None
_metrics_lock = threading.Lock()


def metrics() -> WorkerMetrics:
    global _metrics
    with _metrics_lock:
        if _metrics is None:
            _metrics = WorkerMetrics.create()
        return _metrics


def setup_metrics(port: int | None, address: str = "127.0.0.1") -> None:
    """Serve the metrics on `address`:`port` from the worker's main process; nothing when None.

    Loopback by default: the metrics name queues and volumes, and a worker host is rarely
    meant to answer strangers; an operator whose scraper runs elsewhere sets the address.

    Must run before the first metric is created (values then go to the multiprocess files)
    and before the pool forks.
    """
    if port is None:
        return
    from celery import signals
    from prometheus_client import multiprocess, values

    folder = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    owned = folder is None
    if folder is None:
        folder = tempfile.mkdtemp(prefix="collab-worker-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = folder
    # prometheus-client picks the value class at its import, which the CLI has long done.
    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]

    def serve(**_: object) -> None:
        from prometheus_client import start_http_server

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=folder)  # type: ignore[no-untyped-call]
        start_http_server(port, addr=address, registry=registry)
        log.info("worker metrics on %s port %d", address, port)

    def forget_process(**_: object) -> None:
        multiprocess.mark_process_dead(os.getpid(), folder)  # type: ignore[no-untyped-call]

    def remove_folder(**_: object) -> None:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)

    signals.worker_init.connect(serve, weak=False, dispatch_uid="collab-metrics-serve")
    signals.worker_process_shutdown.connect(
        forget_process, weak=False, dispatch_uid="collab-metrics-forget"
    )
    signals.worker_shutdown.connect(remove_folder, weak=False, dispatch_uid="collab-metrics-rm")
