"""Prometheus metrics read from the node at scrape time.

A collector, not counters bumped on the hot path: the fan-out loop keeps plain integers and
the scrape turns them into metrics, so delivering a message costs nothing extra.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from realtime.node import Node


class NodeCollector(Collector):
    def __init__(self, node: Callable[[], Node | None]) -> None:
        self._node = node

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        node = self._node()
        if node is None:
            return
        hub = node.hub
        yield GaugeMetricFamily(
            "collab_connections", "Open WebSocket connections on this node", len(hub.connections)
        )
        yield GaugeMetricFamily(
            "collab_channels", "Rooms and feeds with members on this node", len(hub.channels)
        )
        yield GaugeMetricFamily(
            "collab_backed_up_connections",
            "Connections whose outgoing queue is not empty",
            sum(1 for c in hub.connections.values() if c.backed_up),
        )
        yield GaugeMetricFamily(
            "collab_direct_write_connections",
            "Connections whose frames are written straight to the transport, not via ASGI send",
            sum(1 for c in hub.connections.values() if c.writes_directly),
        )
        yield CounterMetricFamily(
            "collab_connections_closed_too_slow",
            "Connections closed with 4408 because their outgoing queue overflowed",
            node.closed_too_slow,
        )
        yield CounterMetricFamily(
            "collab_join_buffer_overflows",
            "Joining members closed with 4408: more arrived before their reply than the bound",
            hub.pending_overflows,
        )
        yield GaugeMetricFamily(
            "collab_join_buffer_bytes",
            "Bytes held for members whose join or subscribe reply is not out yet",
            sum(m.pending_bytes for c in list(hub.channels.values()) for m in c.members.values()),
        )
        yield CounterMetricFamily(
            "collab_recovery_backlog_overflows",
            "Channels whose gap-recovery backlog passed its bound (members sent to recover)",
            hub.backlog_overflows,
        )
        yield GaugeMetricFamily(
            "collab_recovery_backlog_bytes",
            "Bytes held by channels recovering a gap",
            sum(c.backlog_bytes for c in list(hub.channels.values())),
        )
        yield CounterMetricFamily(
            "collab_messages_published", "Messages published through this node", node.published
        )
        yield CounterMetricFamily(
            "collab_deliveries", "Frames handed to local members by the fan-out", hub.deliveries
        )
        yield GaugeMetricFamily(
            "collab_broker_up", "1 when the broker answers", 1.0 if node.broker.healthy else 0.0
        )
        yield GaugeMetricFamily(
            "collab_persistence_up",
            "1 when the last batch of messages was handed to storage",
            1.0 if node.sink.healthy else 0.0,
        )
        yield CounterMetricFamily(
            "collab_messages_acknowledged",
            "Publishes answered with an ack: stored (in-process) or in the Celery broker",
            node.acknowledged,
        )
        yield CounterMetricFamily(
            "collab_messages_unconfirmed_replies",
            "Publishes delivered whose storage did not confirm: answered outcome unknown",
            node.unconfirmed_replies,
        )
        reconciler = node.reconciler
        if reconciler is not None:
            for name, doc in (
                ("verified", "Published offsets the reconciler confirmed stored"),
                ("restored", "Messages the reconciler stored again from the broker's window"),
                ("set_aside", "Messages the database refused while the reconciler stored them"),
                ("lost", "Published messages neither stored nor in the window any more"),
                ("failures", "Reconciler passes that failed (broker or database unavailable)"),
            ):
                yield CounterMetricFamily(f"collab_storage_{name}", doc, getattr(reconciler, name))
            yield GaugeMetricFamily(
                "collab_storage_lag_seconds",
                "Age of the oldest published message not yet confirmed stored, as this node's "
                "reconciler saw it (includes the grace period; alert well above it)",
                reconciler.lag,
            )
        for name, doc in (
            ("stored", "Messages written by this node's in-process sink"),
            ("set_aside", "Messages the database refused in this node's in-process sink"),
            ("refused_busy", "Publishes the in-process sink turned away: too many waiting"),
            ("messages_sent", "Messages handed to the Celery broker by this node"),
            ("send_failures", "Batches the Celery broker did not take"),
        ):
            value = getattr(node.sink, name, None)
            if isinstance(value, int):
                yield CounterMetricFamily(f"collab_sink_{name}", doc, value)
