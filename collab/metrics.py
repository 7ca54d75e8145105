"""Prometheus metrics read from the node at scrape time (`realtime.stats` has the convention).

A collector, not counters bumped on the hot path: the fan-out loop keeps plain integers, each
component names them in its `stats()`, and the scrape turns them into metrics, so delivering a
message costs nothing extra.
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
        for stat in node.stats():
            family = CounterMetricFamily if stat.kind == "counter" else GaugeMetricFamily
            yield family(f"collab_{stat.name}", stat.doc, stat.value)
