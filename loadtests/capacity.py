"""The capacity model of docs/SCALING.md, computed from measured figures.

Inputs: one or more results of `loadtests/bench_redis_shard.py` (with different numbers of
subscribed nodes, so the cost of each pub/sub copy can be told from the cost of the publish
itself); results of `loadtests/fanout.py compare --broker-url ...` (`--hub`), for what a hub
node on the broker does per CPU-second: publishes (its case with the fewest subscribers) and
deliveries (its case with the most), medians over every run given; and the figures of a
Celery worker and of idle connections (defaults: the medians in docs/PERSISTENCE.md and
docs/BENCHMARKS.md, measured on a 2-core VM; pass your own).

For a target (connections, published messages per second, room size) it prints how many hub
processes, Redis shards, Celery workers and PostgreSQL writes that takes:

    python -m loadtests.capacity --shard shard-0.json --shard shard-4.json --hub hub-1.json \\
        --connections 1000000 --published 100000 --room-sizes 10,100,1000,10000

Assumptions (each one a flag): every connection is in one room, rooms are the same size and
equally busy, members land on hub processes at random, every room is durable (stored).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# docs/BENCHMARKS.md, "Fan-out": one Collab process (one core), 2,000 subscribers in a room.
DELIVERIES_PER_CORE = 262_000
# docs/BENCHMARKS.md, "10,000 idle connections": held at ~1% of a core and 22 KB each; the
# process's default COLLAB_MAX_CONNECTIONS is 10,000.
CONNECTIONS_PER_PROCESS = 10_000
# Without --hub: a hub process's publishes per core, a guess (measure with --hub).
PUBLISHES_PER_CORE = 10_000
# docs/PERSISTENCE.md, "Benchmark": one `collab worker` (2 prefork processes), Redis as the
# Celery broker, batches of 500, stored to PostgreSQL, median of 5 runs.
STORED_PER_WORKER = 23_200
PERSIST_BATCH = 500


@dataclass(frozen=True)
class ShardCost:
    """Per published message on the shard that owns its room: CPU and bytes out, as a line
    in the number of subscribed nodes (each gets its own pub/sub copy)."""

    cpu_us_base: float
    cpu_us_per_node: float
    bytes_out_base: float
    bytes_out_per_node: float
    bytes_in: float
    calls: float

    @classmethod
    def fit(cls, results: list[dict[str, float]]) -> ShardCost:
        xs = [float(r["subscribed_nodes"]) for r in results]
        cpu = [float(r["redis_cpu_us_per_message"]) for r in results]
        out = [float(r["bytes_out_per_message"]) for r in results]
        cpu_a, cpu_b = _line(xs, cpu)
        out_a, out_b = _line(xs, out)
        return cls(
            cpu_us_base=cpu_a,
            cpu_us_per_node=max(cpu_b, 0.0),
            bytes_out_base=out_a,
            bytes_out_per_node=max(out_b, 0.0),
            bytes_in=sum(float(r["bytes_in_per_message"]) for r in results) / len(results),
            calls=sum(float(r["calls_per_message"]) for r in results) / len(results),
        )


def _line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x; with one point, b = 0."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return mean_y, 0.0
    b = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return mean_y - b * mean_x, b


@dataclass(frozen=True)
class HubCost:
    """What one hub process on the broker does per CPU-second of its own, medians over runs."""

    publishes_per_core: float
    deliveries_per_core: float
    runs: int

    @classmethod
    def from_results(cls, results: list[dict[str, Any]]) -> HubCost:
        cases = [
            case
            for result in results
            for case in result["cases"]
            if case["target"].endswith("-redis") and case.get("burst") and not case.get("error")
        ]
        if not cases:
            raise SystemExit("--hub: no case of a hub on a broker (fanout.py --broker-url)")
        fewest = min(case["subscribers"] for case in cases)
        most = max(case["subscribers"] for case in cases)
        return cls(
            publishes_per_core=statistics.median(
                c["burst"]["messages_per_server_cpu_s"] for c in cases if c["subscribers"] == fewest
            ),
            deliveries_per_core=statistics.median(
                c["burst"]["deliveries_per_server_cpu_s"] for c in cases if c["subscribers"] == most
            ),
            runs=sum(1 for c in cases if c["subscribers"] == most),
        )


def nodes_reached(members: int, processes: int) -> float:
    """Expected distinct hub processes holding a room's `members`, placed at random."""
    return processes * (1 - (1 - 1 / processes) ** members)


@dataclass(frozen=True)
class Plan:
    room_size: int
    rooms: int
    deliveries: float
    processes: int
    bound_by: str
    nodes_per_room: float
    shards: int
    redis_out_mb: float
    workers: int
    pg_rows: float
    pg_commits: float


def plan(args: argparse.Namespace, shard: ShardCost, room_size: int) -> Plan:
    deliveries = args.published * room_size
    needs = {
        "deliveries": deliveries / args.deliveries_per_core,
        "connections": args.connections / args.connections_per_process,
        "publishes": args.published / args.publishes_per_core,
    }
    bound_by = max(needs, key=lambda k: needs[k])
    processes = max(1, math.ceil(needs[bound_by] / args.utilisation))
    reached = nodes_reached(room_size, processes)
    cpu_us = shard.cpu_us_base + shard.cpu_us_per_node * reached
    shards = max(1, math.ceil(args.published * cpu_us / 1e6 / args.utilisation))
    out_bytes = args.published * (shard.bytes_out_base + shard.bytes_out_per_node * reached)
    return Plan(
        room_size=room_size,
        rooms=max(1, args.connections // room_size),
        deliveries=deliveries,
        processes=processes,
        bound_by=bound_by,
        nodes_per_room=reached,
        shards=shards,
        redis_out_mb=out_bytes / 1e6,
        workers=max(1, math.ceil(args.published / args.stored_per_worker / args.utilisation)),
        pg_rows=args.published,
        pg_commits=args.published / args.batch,
    )


def table(plans: list[Plan]) -> str:
    lines = [
        "| room size | rooms | deliveries/s | hub processes (bound by) | nodes per room "
        "| Redis shards | Redis out MB/s | workers | PG rows/s | PG commits/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in plans:
        lines.append(
            f"| {p.room_size:,} | {p.rooms:,} | {p.deliveries:,.0f} | {p.processes:,} "
            f"({p.bound_by}) | {p.nodes_per_room:,.0f} | {p.shards:,} | {p.redis_out_mb:,.0f} "
            f"| {p.workers:,} | {p.pg_rows:,.0f} | {p.pg_commits:,.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shard", type=Path, action="append", required=True)
    parser.add_argument(
        "--hub",
        type=Path,
        action="append",
        default=[],
        help="a fanout.py result with a hub on the broker: sets publishes and deliveries per core",
    )
    parser.add_argument("--connections", type=int, default=1_000_000)
    parser.add_argument("--published", type=float, default=100_000)
    parser.add_argument("--room-sizes", default="10,100,1000,10000")
    parser.add_argument("--deliveries-per-core", type=float)
    parser.add_argument("--connections-per-process", type=float, default=CONNECTIONS_PER_PROCESS)
    parser.add_argument("--publishes-per-core", type=float)
    parser.add_argument("--stored-per-worker", type=float, default=STORED_PER_WORKER)
    parser.add_argument("--batch", type=float, default=PERSIST_BATCH)
    parser.add_argument(
        "--utilisation", type=float, default=0.5, help="the share of each core planned for"
    )
    args = parser.parse_args()
    shard = ShardCost.fit([json.loads(path.read_text()) for path in args.shard])
    if args.hub:
        hub = HubCost.from_results([json.loads(path.read_text()) for path in args.hub])
        print(
            f"a hub process on the broker, per CPU-second ({hub.runs} runs): "
            f"{hub.publishes_per_core:,.0f} publishes, {hub.deliveries_per_core:,.0f} deliveries"
        )
        args.publishes_per_core = args.publishes_per_core or hub.publishes_per_core
        args.deliveries_per_core = args.deliveries_per_core or hub.deliveries_per_core
    args.publishes_per_core = args.publishes_per_core or PUBLISHES_PER_CORE
    args.deliveries_per_core = args.deliveries_per_core or DELIVERIES_PER_CORE
    print(
        f"per message on its shard: {shard.cpu_us_base:.1f} us + {shard.cpu_us_per_node:.1f} "
        f"us per subscribed node; {shard.bytes_in:.0f} B in, {shard.bytes_out_base:.0f} B + "
        f"{shard.bytes_out_per_node:.0f} B per subscribed node out; {shard.calls:.1f} calls"
    )
    sizes = [int(size) for size in args.room_sizes.split(",")]
    print(table([plan(args, shard, size) for size in sizes]))


if __name__ == "__main__":
    main()
