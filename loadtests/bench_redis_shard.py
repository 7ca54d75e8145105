"""What one published message costs a Redis shard: commands, bytes and CPU, measured.

A node (this process, the server's own `RedisBroker`) publishes durable messages into many
rooms over a Redis Cluster (`redis+cluster://...`) or one Redis (`redis://...`) for a while,
with `--subscribers` more nodes subscribed to every room (as hub nodes with members there
are). Before and after, every master's INFO is read; the difference, divided by the messages
published, is the cost per message on the shards:

- commands per message (top-level, and with the calls inside the publish script);
- bytes in and out per message (the publish, and the pub/sub copy to each subscribed node);
- Redis CPU microseconds per message, hence messages per second one shard's core can take.

The publisher here is one Python process on a small machine, so the shards are far from
busy: the figure that scales is CPU per message, not the rate reached. The result is a JSON
file that `loadtests/capacity.py` reads.

    python -m loadtests.bench_redis_shard --url redis+cluster://127.0.0.1:7100 \\
        --seconds 10 --out shard.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
import redis

from realtime.broker import Publication
from realtime.broker_redis import RedisBroker
from realtime.redis_client import cluster_seeds, is_cluster
from realtime.types import new_msg_id


class Counter:
    """A BrokerHandler that counts what a subscribed node receives."""

    def __init__(self) -> None:
        self.received = 0

    def on_publication(self, publication: Publication) -> None:
        self.received += 1

    def on_event(self, channel: str, frame: bytes, exclude_user: str | None) -> None:
        pass

    def on_presence(self, channel: str, frame: bytes) -> None:
        pass

    def on_resubscribed(self, channels: list[str]) -> None:
        pass


def masters(url: str) -> list[redis.Redis]:
    if not is_cluster(url):
        return [redis.Redis.from_url(url)]
    host, port = cluster_seeds(url)[0]
    from redis.cluster import RedisCluster

    cluster = RedisCluster(host=host, port=port)
    try:
        primaries = cluster.get_primaries()  # type: ignore[no-untyped-call]
        return [redis.Redis(host=n.host, port=n.port) for n in primaries]
    finally:
        cluster.close()


def snapshot(shards: list[redis.Redis]) -> dict[str, float]:
    """Sums over the masters of what INFO counts."""
    total: dict[str, float] = {
        "commands": 0,
        "calls": 0,
        "bytes_in": 0,
        "bytes_out": 0,
        "cpu": 0,
    }
    for shard in shards:
        stats = shard.info("stats")
        cpu = shard.info("cpu")
        commandstats = shard.info("commandstats")
        total["commands"] += float(stats["total_commands_processed"])
        total["calls"] += sum(float(v["calls"]) for v in commandstats.values())
        total["bytes_in"] += float(stats["total_net_input_bytes"])
        total["bytes_out"] += float(stats["total_net_output_bytes"])
        total["cpu"] += float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])
    return total


async def run(args: argparse.Namespace) -> dict[str, Any]:
    rooms = [f"room:bench-{uuid.uuid4().hex[:8]}" for _ in range(args.rooms)]
    body = orjson.dumps({"text": "x" * args.body_bytes})
    publisher = RedisBroker(args.url, node_id="bench-publisher")
    await publisher.start(Counter())
    subscribers = []
    for i in range(args.subscribers):
        counter = Counter()
        broker = RedisBroker(args.url, node_id=f"bench-subscriber-{i}")
        await broker.start(counter)
        for room in rooms:
            await broker.subscribe(room)
        subscribers.append((broker, counter))
    shards = masters(args.url)
    published = 0
    stop = time.monotonic() + args.seconds

    async def publish_loop(index: int) -> None:
        nonlocal published
        while time.monotonic() < stop:
            msg_id = new_msg_id()
            fields = b'{"msg_id":"' + msg_id.encode() + b'","body":' + body + b"}"
            await publisher.publish(
                rooms[(published + index) % len(rooms)],
                kind="message",
                name_key="room",
                msg_id=msg_id,
                fields=fields,
                durable=True,
            )
            published += 1

    before = snapshot(shards)
    started = time.monotonic()
    await asyncio.gather(*(publish_loop(i) for i in range(args.concurrency)))
    elapsed = time.monotonic() - started
    after = snapshot(shards)
    await asyncio.sleep(0.5)  # the last deliveries
    delivered = [counter.received for _, counter in subscribers]
    for broker, _ in subscribers:
        await broker.close()
    await publisher.close()
    delta = {key: after[key] - before[key] for key in before}
    cpu_per_message = delta["cpu"] / published
    return {
        "url": args.url,
        "shards": len(shards),
        "rooms": args.rooms,
        "subscribed_nodes": args.subscribers,
        "body_bytes": args.body_bytes,
        "seconds": round(elapsed, 2),
        "published": published,
        "published_per_second": round(published / elapsed),
        "delivered_per_subscriber": delivered,
        "commands_per_message": round(delta["commands"] / published, 2),
        "calls_per_message": round(delta["calls"] / published, 2),
        "bytes_in_per_message": round(delta["bytes_in"] / published),
        "bytes_out_per_message": round(delta["bytes_out"] / published),
        "redis_cpu_us_per_message": round(cpu_per_message * 1e6, 1),
        "messages_per_shard_core": round(1 / cpu_per_message) if cpu_per_message else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="redis+cluster://host:port or redis://")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--rooms", type=int, default=300)
    parser.add_argument("--subscribers", type=int, default=2, help="nodes subscribed to all")
    parser.add_argument("--concurrency", type=int, default=64, help="publishes in flight")
    parser.add_argument("--body-bytes", type=int, default=200)
    parser.add_argument("--out", type=Path, help="write the result here as JSON")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
