"""How the realtime core reports what it counts: plain numbers, read at scrape time.

The convention, followed by every component (`Hub`, `Node`, the sinks, the reconciler):

- A component keeps plain `int` counters (or computes gauges) as attributes; the hot path does
  `self.x += 1` and nothing else: no metric object, no lock, no label lookup per message.
- The same component names them in one method, `stats()`, next to the counters: each a `Stat`
  with its Prometheus name (without `collab_`), its help text and its kind.
- `Node.stats()` gathers its parts'; `collab.metrics.NodeCollector` turns them into Prometheus
  metrics when `/metrics` is scraped (through `Node.stats_in_slices()`, the same figures with
  the hub's census counted a slice of connections per loop turn), and knows no component by
  name.

A new metric is therefore a counter and a line in its owner's `stats()`; a new component with
metrics implements `stats()` and is added to `Node.stats()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True, slots=True)
class Stat:
    name: str  # `collab_<name>` in Prometheus; counters get `_total` from the client library
    doc: str
    value: float
    kind: Literal["counter", "gauge"] = "counter"


def gauge(name: str, doc: str, value: float) -> Stat:
    return Stat(name, doc, value, "gauge")
