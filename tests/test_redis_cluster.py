"""What only a Redis Cluster can show (the shared suites run the contract on it already):
rooms spread over every shard, one sharded subscription per room per node on the shard that
owns it and none left behind, and a master SIGKILLed under a busy room.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import orjson
import pytest
import redis
from websockets.exceptions import ConnectionClosed

from realtime.broker import Broker, BrokerUnavailable, Publication, PublishResult
from realtime.broker_redis import RedisBroker
from realtime.redis_client import never_sent
from realtime.types import new_msg_id
from tests.processes import ServerProcess
from tests.redis_cluster import RedisClusterProcesses
from tests.services import free_port
from tests.test_cluster_e2e import (
    PRESENCE_TIMEOUT,
    join_on,
    presence_of,
    start_nodes,
    stop_nodes,
    stored_msg_ids,
)
from tests.wsclient import Client, Frame, guest, guest_token

pytestmark = pytest.mark.redis_cluster


class Seen:
    """A BrokerHandler that remembers publications and resubscriptions."""

    def __init__(self) -> None:
        self.publications: list[Publication] = []
        self.resubscribed: list[str] = []

    def on_publication(self, publication: Publication) -> None:
        self.publications.append(publication)

    def on_event(self, channel: str, frame: bytes, exclude_user: str | None) -> None:
        pass

    def on_presence(self, channel: str, frame: bytes) -> None:
        pass

    def on_resubscribed(self, channels: list[str]) -> None:
        self.resubscribed.extend(channels)

    def offsets(self, channel: str) -> list[int]:
        return [p.offset for p in self.publications if p.channel == channel]


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout}s")
        await asyncio.sleep(0.01)


async def publish(broker: Broker, room: str, n: int) -> PublishResult:
    msg_id = new_msg_id()
    return await broker.publish(
        room,
        kind="message",
        name_key="room",
        msg_id=msg_id,
        fields=orjson.dumps({"msg_id": msg_id, "n": n}),
        durable=True,
    )


def offsets_reach(seen: Seen, room: str, count: int) -> Callable[[], bool]:
    return lambda: len(seen.offsets(room)) == count


def no_subscription(port: int, room: str) -> Callable[[], bool]:
    return lambda: shard_subscriptions(port, room) == 0


def reply_to(command_id: str) -> Callable[[Frame], bool]:
    return lambda frame: frame.get("id") == command_id


def pubsub_key(room: str) -> str:
    return f"collab:{{{room}}}:ps:0"


def shard_subscriptions(port: int, room: str) -> int:
    """How many connections of that master are subscribed to the room's shard channel."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
    try:
        reply = client.execute_command(  # type: ignore[no-untyped-call]  # redis-py's is untyped
            "PUBSUB", "SHARDNUMSUB", pubsub_key(room)
        )
        return int(reply[1])
    finally:
        client.close()


@pytest.fixture
async def nodes(redis_cluster_url: str) -> AsyncIterator[list[tuple[RedisBroker, Seen]]]:
    made: list[tuple[RedisBroker, Seen]] = []
    for i in range(2):
        broker = RedisBroker(redis_cluster_url, node_id=f"node-{i}")
        seen = Seen()
        await broker.start(seen)
        made.append((broker, seen))
    yield made
    for broker, _ in made:
        await broker.close()


def rooms_on_every_shard(
    cluster: RedisClusterProcesses, channel: Callable[[str], str] = str
) -> dict[int, str]:
    """A room per master (its port): names drawn until every master owns one's `channel`."""
    found: dict[int, str] = {}
    while len(found) < cluster.masters:
        name = f"rc-{uuid.uuid4().hex[:8]}"
        found.setdefault(cluster.master_of(pubsub_key(channel(name))), name)
    return found


async def test_rooms_on_every_shard_reach_both_nodes_in_order_with_one_subscription_each(
    redis_cluster: RedisClusterProcesses, nodes: list[tuple[RedisBroker, Seen]]
) -> None:
    (first, first_seen), (second, second_seen) = nodes
    by_master = rooms_on_every_shard(redis_cluster)
    assert len(by_master) == 3
    for room in by_master.values():
        await first.subscribe(room)
        await second.subscribe(room)
        await second.subscribe(room)  # the hub may ask twice; still one subscription
    for port, room in by_master.items():
        assert shard_subscriptions(port, room) == 2  # one per node, on the owning shard

    # Both nodes publish at once into every room; each sees every room's offsets in order.
    async def burst(broker: RedisBroker, start: int) -> None:
        for n in range(start, start + 25):
            await asyncio.gather(*(publish(broker, room, n) for room in by_master.values()))

    await asyncio.gather(burst(first, 0), burst(second, 100))
    for room in by_master.values():
        for seen in (first_seen, second_seen):
            await eventually(offsets_reach(seen, room, 50), 5, "deliveries")
            assert seen.offsets(room) == list(range(1, 51))

    # Join/leave cycles leave no subscription behind, on any shard.
    room = next(iter(by_master.values()))
    for _ in range(1000):
        await second.subscribe(room)
        await second.unsubscribe(room)
    await second.subscribe(room)
    assert shard_subscriptions(redis_cluster.master_of(pubsub_key(room)), room) == 2
    for port, each in by_master.items():
        await first.unsubscribe(each)
        await second.unsubscribe(each)
        await eventually(no_subscription(port, each), 5, "unsubscribed")
    assert await first.unconfirmed() != []  # the ledger (16 slot groups) names the rooms


async def test_only_a_connection_refused_outright_counts_as_a_command_never_sent() -> None:
    """The one error the cluster client sends a command again after: a connect refused. A
    connection that was accepted and then dropped may have carried the command (a publish
    script may have run), so it is never taken for one that was not sent."""

    async def drop(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)  # the command has arrived
        writer.transport.abort()

    dropper = await asyncio.start_server(drop, "127.0.0.1", 0)
    dropping_port = dropper.sockets[0].getsockname()[1]
    errors: list[Exception] = []
    try:
        for port in (free_port(), dropping_port):
            client = redis.asyncio.Redis(port=port, socket_timeout=2, protocol=2)
            try:
                await client.execute_command("INCR", "k")  # type: ignore[no-untyped-call]
            except redis.ConnectionError as exc:
                errors.append(exc)
            finally:
                await client.aclose()
    finally:
        dropper.close()
    assert [never_sent(e) for e in errors] == [True, False], errors


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisClusterProcesses]:
    cluster = RedisClusterProcesses(tmp_path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


async def test_a_killed_master_fails_over_to_a_new_epoch_and_the_room_works_again(
    own_cluster: RedisClusterProcesses,
) -> None:
    """SIGKILL the master of a busy room's shard. Publishes during the switch answer
    `unavailable` (nothing else); within the failover time the room takes publishes again,
    in a new epoch from offset 1 (the promoted replica may lack acknowledged writes, so no
    offset is ever handed out twice), and the subscribed node resubscribes and gets them."""
    publisher, subscriber = RedisBroker(own_cluster.url), RedisBroker(own_cluster.url)
    seen = Seen()
    await publisher.start(Seen())
    await subscriber.start(seen)
    try:
        room = f"room:f{uuid.uuid4().hex[:8]}"
        await subscriber.subscribe(room)
        before = [await publish(publisher, room, n) for n in range(20)]
        await eventually(lambda: len(seen.offsets(room)) == 20, 5, "deliveries before")

        own_cluster.kill(own_cluster.master_of(pubsub_key(room)))
        killed = time.monotonic()
        refused = 0
        after: PublishResult | None = None
        while after is None:
            assert time.monotonic() - killed < 30, "no failover within 30 s"
            try:
                after = await publish(publisher, room, 1000)
            except BrokerUnavailable:
                refused += 1
                await asyncio.sleep(0.1)
        took = time.monotonic() - killed
        print(f"failover: publishes again after {took:.1f}s, {refused} refused meanwhile")
        assert refused > 0
        assert after.epoch != before[0].epoch and after.offset == 1

        await eventually(lambda: room in seen.resubscribed, 15, "the subscriber resubscribed")
        await eventually(lambda: subscriber.healthy, 15, "the subscriber healthy again")
        more = [await publish(publisher, room, n) for n in range(3)]
        assert [r.offset for r in more] == [2, 3, 4]
        await eventually(
            lambda: (
                [p.offset for p in seen.publications if p.epoch == after.epoch][-3:] == [2, 3, 4]
            ),
            10,
            "deliveries after the failover",
        )
    finally:
        await publisher.close()
        await subscriber.close()


async def test_a_subscribe_is_what_gets_a_node_past_a_failover_it_sent_no_command_through(
    own_cluster: RedisClusterProcesses, caplog: pytest.LogCaptureFixture
) -> None:
    """A node whose only traffic to a shard is subscriptions (a join subscribes before it
    sends any command) learns of that shard's failover from nothing else: the failed
    subscribe itself has to get the slot map refreshed, or every later join of the shard's
    rooms answers `unavailable` on that node long after the replica took over. Tried as the
    hub does: each failed subscribe is given up (`unsubscribe`) and tried again."""
    node, publisher = RedisBroker(own_cluster.url), RedisBroker(own_cluster.url)
    seen = Seen()
    await node.start(seen)
    await publisher.start(Seen())
    try:
        # A room on a shard the publisher holds no connection to (an open one to the dead
        # master would carry its next command into a closed socket: maybe sent, never retried).
        assert publisher._cluster is not None
        connected = {
            shard.port
            for shard in publisher._cluster.get_nodes()
            if any(c.is_connected for c in shard._connections)
        }
        room = f"room:s{uuid.uuid4().hex[:8]}"
        while own_cluster.master_of(pubsub_key(room)) in connected:
            room = f"room:s{uuid.uuid4().hex[:8]}"
        await node.subscribe(room)  # the shard's listener exists, then holds nothing
        await node.unsubscribe(room)
        master = own_cluster.master_of(pubsub_key(room))
        own_cluster.kill(master)
        await eventually(
            lambda: own_cluster.master_of(pubsub_key(room)) != master, 30, "the failover"
        )
        failed_over = time.monotonic()
        await eventually(
            lambda: len(set(own_cluster.masters_seen(pubsub_key(room)))) == 1,
            10,
            "every node knows",
        )
        refused = 0
        while True:
            try:
                await node.subscribe(room)
                break
            except BrokerUnavailable:
                refused += 1
                await node.unsubscribe(room)
                assert time.monotonic() - failed_over < 10, (
                    f"still refused 10 s after the failover ({refused} attempts)"
                )
                await asyncio.sleep(0.1)
        print(f"subscribed {time.monotonic() - failed_over:.1f}s after the failover")
        # The publisher sent nothing to the shard since the failover, so its first command
        # goes to the dead master and is refused a connection: nothing was sent, so it is sent
        # once more on the refreshed slot map, and the publish succeeds on the first call.
        caplog.set_level(logging.INFO, "realtime.redis_client")
        offset = (await publish(publisher, room, 1)).offset
        assert f"127.0.0.1:{master}" in caplog.text  # the refusal it went past
        await eventually(lambda: seen.offsets(room) == [offset], 5, "the delivery")
    finally:
        await node.close()
        await publisher.close()


@pytest.fixture(scope="module")
def hub_processes(
    redis_cluster: RedisClusterProcesses,
    tmp_path_factory: pytest.TempPathFactory,
    sqlite_template: Path,
) -> Iterator[list[ServerProcess]]:
    """Three `collab serve` processes on the session's cluster, started once for the module
    (a start costs seconds). Tests keep apart by their random room names."""
    folder = tmp_path_factory.mktemp("hubs")
    nodes = start_nodes(folder, sqlite_template, redis_cluster.url, ["ha", "hb", "hc"])
    try:
        yield nodes
    finally:
        stop_nodes(nodes)


@pytest.fixture
def hubs(hub_processes: list[ServerProcess]) -> list[ServerProcess]:
    """The module's three hub nodes, any that an earlier test killed started again."""
    for node in hub_processes:
        if node.process is None or node.process.poll() is not None:
            node.start()
    return hub_processes


async def test_a_script_publishes_into_a_room_of_the_cluster(hubs: list[ServerProcess]) -> None:
    """`collab.publisher` (a Celery task, a cron script) with the servers' own
    `redis+cluster://` settings: the room's members on every node get the message in the
    room's order, and a retry with its `client_msg_id` delivers nothing again."""
    from collab.publisher import Publisher
    from collab.settings import Settings

    room = f"pub-{uuid.uuid4().hex[:8]}"
    members = [
        await join_on(node, guest_token(node.url, name), room)
        for node, name in zip(hubs, ["ann", "bob", "carol"], strict=True)
    ]
    env = hubs[0].env
    settings = Settings(
        env="test",
        broker_url=env["COLLAB_BROKER_URL"],
        database_url=env["COLLAB_DATABASE_URL"],
        secret_key=env["COLLAB_SECRET_KEY"],
    )
    assert settings.broker_url.startswith("redis+cluster://")
    async with Publisher(settings, name="nightly") as publisher:
        first = await publisher.publish(room, {"text": "report"}, client_msg_id="report-1")
        again = await publisher.publish(room, {"text": "report"}, client_msg_id="report-1")
    assert (again.epoch, again.offset, again.msg_id) == (first.epoch, first.offset, first.msg_id)
    for client, joined in members:
        [message] = await client.messages(room, 1)
        assert message["offset"] == first.offset == joined["offset"] + 1
        assert message["msg_id"] == first.msg_id and message["epoch"] == joined["epoch"]
        assert message["user"] == {"id": "service:nightly", "name": "nightly"}
        assert await client.no_frame(lambda f: f.get("type") == "message")


async def test_two_hub_nodes_on_the_cluster_share_rooms_and_presence(
    hubs: list[ServerProcess],
) -> None:
    """Two `collab serve` processes on the Redis Cluster (COLLAB_BROKER_URL=redis+cluster://):
    in rooms on different shards, members on both nodes get every message of both nodes'
    publishers in one offset order, each sees the other node's member present, and a member
    who switches node recovers exactly what he missed."""
    nodes = hubs[:2]
    rooms = [f"rc-{uuid.uuid4().hex[:8]}" for _ in range(3)]
    (ann_token, ann_id), (bob_token, bob_id) = (
        guest(nodes[0].url, "ann"),
        guest(nodes[1].url, "bob"),
    )
    for room in rooms:
        ann, _ = await join_on(nodes[0], ann_token, room)
        bob, _ = await join_on(nodes[1], bob_token, room)

        async def send(client: Client, room: str = room) -> list[Frame]:
            # One reader per WebSocket: each client's requests one after another.
            return [
                await client.request({"type": "publish", "room": room, "body": {"n": n}})
                for n in range(10)
            ]

        acks = [ack for per in await asyncio.gather(send(ann), send(bob)) for ack in per]
        assert sorted(a["offset"] for a in acks) == list(range(1, 21))
        for member in (ann, bob):
            got = await member.messages(room, 20, timeout=10)
            assert [m["offset"] for m in got] == list(range(1, 21))
            assert {m["msg_id"] for m in got} == {a["msg_id"] for a in acks}
        assert await presence_of(ann, room) == {ann_id: 1, bob_id: 1}
        # Bob switches node while ann keeps writing: his recovery on node a has exactly
        # what he missed, from the window on the room's shard.
        epoch = got[-1]["epoch"]
        await bob.close()
        missed = [
            await ann.request({"type": "publish", "room": room, "body": {"m": n}}) for n in range(3)
        ]
        bob, joined = await join_on(nodes[0], bob_token, room, since={"epoch": epoch, "offset": 20})
        assert joined["recovered"] is True
        assert [m["msg_id"] for m in joined["missed"]] == [a["msg_id"] for a in missed]
        await ann.close()
        await bob.close()


# --- three hub nodes ---------------------------------------------------------------------------


def hub_channel(room: str) -> str:
    """The broker channel of a hub room."""
    return f"room:{room}"


def shard_channels(cluster: RedisClusterProcesses, rooms: list[str]) -> dict[int, set[str]]:
    """Which of `rooms` have a sharded subscriber, per node of the cluster (masters and
    replicas alike: a subscription left on any of them is a leak)."""
    ours = {pubsub_key(hub_channel(room)): room for room in rooms}
    found: dict[int, set[str]] = {}
    for port in cluster.processes:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=2)
        try:
            names = client.execute_command(  # type: ignore[no-untyped-call]  # untyped in redis-py
                "PUBSUB", "SHARDCHANNELS", "collab:*"
            )
        finally:
            client.close()
        subscribed = {ours[name.decode()] for name in names if name.decode() in ours}
        if subscribed:
            found[port] = subscribed
    return found


async def joined_everywhere(node: ServerProcess, token: str, rooms: list[str]) -> Client:
    """A new connection to `node`, a member of every room."""
    client = await Client.connect(node.ws_url, token)
    for room in rooms:
        reply = await client.request({"type": "join", "room": room})
        assert reply["type"] == "joined", reply
    return client


async def test_three_hub_nodes_deliver_every_shards_rooms_once_in_one_order(
    redis_cluster: RedisClusterProcesses, hubs: list[ServerProcess]
) -> None:
    """A room on every master; on each of three nodes a listener and a publisher in all of
    them; the three publishers send into every room at once, without waiting for acks. Every
    client on every node gets each room's messages once, offsets 1..N without a gap, in the
    same order (the offsets the acks named), each publisher's in the order it sent them; and
    each node holds one subscription per room, on the room's master."""
    by_master = rooms_on_every_shard(redis_cluster, hub_channel)
    rooms = list(by_master.values())
    listeners, publishers = [], []
    for i, node in enumerate(hubs):
        listeners.append(await joined_everywhere(node, guest_token(node.url, f"l{i}"), rooms))
        publishers.append(await joined_everywhere(node, guest_token(node.url, f"p{i}"), rooms))
    for port, room in by_master.items():
        assert shard_subscriptions(port, hub_channel(room)) == len(hubs)
    per_room = 15

    async def send_all(index: int) -> list[Frame]:
        client = publishers[index]
        sends = [
            (f"p{index}-{n}-{r}", room, n) for n in range(per_room) for r, room in enumerate(rooms)
        ]
        for command_id, room, n in sends:
            body = {"p": index, "n": n}
            await client.send({"type": "publish", "id": command_id, "room": room, "body": body})
        return [await client.wait_for(reply_to(c), 20) for c, _, _ in sends]

    acks = [a for per in await asyncio.gather(*map(send_all, range(len(hubs)))) for a in per]
    assert {a["type"] for a in acks} == {"ack"}, [a for a in acks if a["type"] != "ack"][:3]
    total = per_room * len(publishers)
    for room in rooms:
        acked = {a["offset"]: a["msg_id"] for a in acks if a["room"] == room}
        assert sorted(acked) == list(range(1, total + 1)), "acks name every offset once"
        for member in listeners + publishers:
            got = await member.messages(room, total, timeout=20)
            assert [m["offset"] for m in got] == list(range(1, total + 1))
            assert {m["offset"]: m["msg_id"] for m in got} == acked
            assert len({m["epoch"] for m in got}) == 1
            for index in range(len(publishers)):
                sent = [m["body"]["n"] for m in got if m["body"]["p"] == index]
                assert sent == list(range(per_room))
    # Nothing more comes: no duplicate arrives late.
    for member in listeners + publishers:
        assert await member.no_frame(lambda f: f.get("type") == "message", wait=0.2)


async def test_a_client_that_switches_node_twice_recovers_exactly_what_it_missed(
    redis_cluster: RedisClusterProcesses, hubs: list[ServerProcess]
) -> None:
    """In a room on every shard: ann reads up to offset k on node a and goes; bob publishes on
    node b; ann comes back on node c with her last position and gets exactly the messages she
    missed (as a live member got them) with `recovered: true`, then live ones, no duplicate."""
    a, b, c = hubs
    ann_token, bob_token = guest_token(a.url, "ann"), guest_token(b.url, "bob")
    for room in rooms_on_every_shard(redis_cluster, hub_channel).values():
        bob = await joined_everywhere(b, bob_token, [room])
        ann = await joined_everywhere(a, ann_token, [room])

        async def publish_on_b(count: int, room: str = room, bob: Client = bob) -> list[Frame]:
            acks = [
                await bob.request({"type": "publish", "room": room, "body": {"n": n}})
                for n in range(count)
            ]
            assert {ack["type"] for ack in acks} == {"ack"}, acks
            return await bob.messages(room, count)

        await publish_on_b(3)
        read = await ann.messages(room, 3)
        epoch, last = read[-1]["epoch"], read[-1]["offset"]
        await ann.close()
        missed = await publish_on_b(4)
        ann, joined = await join_on(c, ann_token, room, since={"epoch": epoch, "offset": last})
        assert joined["recovered"] is True
        assert joined["epoch"] == epoch and joined["offset"] == last + 4
        assert joined["missed"] == missed
        (live,) = await publish_on_b(1)
        assert await ann.event("message", room=room) == live
        assert await ann.no_frame(lambda f: f.get("type") == "message", wait=0.2)


async def test_join_leave_cycles_on_three_nodes_leave_no_subscription_on_any_shard(
    redis_cluster: RedisClusterProcesses, hubs: list[ServerProcess]
) -> None:
    """1,000 join/leave cycles, a third on each node at once, over a room on every master,
    while one member stays in one of them: afterwards the cluster (every master and replica,
    `PUBSUB SHARDCHANNELS`) holds exactly the stayer's node's subscription, and none once he
    leaves too; presence holds only him, then nobody."""
    by_master = rooms_on_every_shard(redis_cluster, hub_channel)
    rooms = list(by_master.values())
    kept = rooms[0]
    stayer_token, stayer_id = guest(hubs[0].url, "stayer")
    stayer = await joined_everywhere(hubs[0], stayer_token, [kept])

    async def cycle(index: int, cycles: int, batch: int = 50) -> None:
        node = hubs[index]
        client = await Client.connect(node.ws_url, guest_token(node.url, f"cycler{index}"))
        client.check_frames = False  # thousands of replies: the schema is checked elsewhere
        # Pipelined, a batch of cycles at a time: a connection's commands run one after
        # another on the node, in the order sent, so each leave follows its join.
        for first in range(0, cycles, batch):
            commands: list[Frame] = []
            for n in range(first, min(first + batch, cycles)):
                room = rooms[(n + index) % len(rooms)]
                commands.append(
                    {"type": "join", "id": f"j{n}", "room": room, "presence_events": False}
                )
                commands.append({"type": "leave", "id": f"l{n}", "room": room})
            for command in commands:
                await client.send(command)
            for command in commands:
                reply = await client.wait_for(reply_to(str(command["id"])))
                assert reply["type"] == {"join": "joined", "leave": "left"}[command["type"]]
        await client.close()

    await asyncio.gather(*(cycle(i, 334) for i in range(len(hubs))))  # 1,002 cycles
    kept_master = redis_cluster.master_of(pubsub_key(hub_channel(kept)))
    await eventually(
        lambda: shard_channels(redis_cluster, rooms) == {kept_master: {kept}},
        10,
        "only the stayer's room subscribed",
    )
    assert shard_subscriptions(kept_master, hub_channel(kept)) == 1  # his node's, once
    assert await presence_of(stayer, kept) == {stayer_id: 1}
    assert (await stayer.request({"type": "leave", "room": kept}))["type"] == "left"
    await eventually(lambda: shard_channels(redis_cluster, rooms) == {}, 10, "no subscription")
    assert await presence_of(stayer, kept) == {}


async def test_a_cluster_nobody_answers_means_unavailable_everywhere() -> None:
    """No seed answers: the broker starts unhealthy and every call raises BrokerUnavailable
    (the node answers `unavailable`), as on a single Redis; presence says so too."""
    from realtime.presence import PresenceUnavailable
    from realtime.presence_redis import RedisPresence
    from realtime.types import Position, UserInfo
    from tests.redis_cluster import free_cluster_ports

    ports = free_cluster_ports(2)
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    broker, presence = RedisBroker(url), RedisPresence(url)
    try:
        await broker.start(Seen())
        await presence.start()
        assert not broker.healthy
        room = "room:nobody"
        for call in (
            lambda: publish(broker, room, 1),
            lambda: broker.publish_event(room, b"{}"),
            lambda: broker.position(room),
            lambda: broker.recent(room, Position("abcdef01", 0)),
            lambda: broker.unconfirmed(),
            lambda: broker.subscribe(room),
        ):
            with pytest.raises(BrokerUnavailable):
                await call()
        with pytest.raises(PresenceUnavailable):
            await presence.add(room, "c1", UserInfo("1", "ann"), "n1")
    finally:
        await broker.close()
        await presence.close()


async def test_clients_through_a_master_failover_get_every_ack_or_recovered_false(
    own_cluster: RedisClusterProcesses, tmp_path: Path, sqlite_template: Path
) -> None:
    """Two hub nodes on a cluster whose master of a busy room is SIGKILLed: publishes during
    the switch answer `unavailable`; then the room works again in a new epoch; its members are
    told to reconnect (1011) and their recovery says `recovered: false`; the database holds
    every acknowledged message once."""
    a, b = start_nodes(tmp_path, sqlite_template, own_cluster.url, ["fa", "fb"])
    try:
        room = f"rf-{uuid.uuid4().hex[:8]}"
        ann_token, _ = guest(a.url, "ann")
        bob_token, _ = guest(b.url, "bob")
        ann, joined = await join_on(a, ann_token, room)
        bob, _ = await join_on(b, bob_token, room)
        epoch = joined["epoch"]
        acked: list[str] = []
        offsets: list[int] = []
        deadline = time.monotonic() + 60  # replaced by the failover's own below

        async def rejoin(token: str = ann_token, **join: object) -> tuple[Client, Frame]:
            """Back in the room as a client does it: a join during or right after the switch
            may answer `unavailable` (not done: the room's master was still the dead one, or
            one of the node's Redis clients met the dead master once before refreshing its
            slot map, as it never re-sends a command after a connection error), so it is tried
            again."""
            client = await Client.connect(a.ws_url, token)
            while True:
                reply = await client.request({"type": "join", "room": room, **join})
                if reply["type"] == "joined":
                    return client, reply
                assert reply["type"] == "error" and reply["code"] == "unavailable", reply
                assert time.monotonic() < deadline, f"no join within the deadline: {reply}"
                await asyncio.sleep(0.1)

        async def send(n: int) -> str:
            nonlocal ann
            try:
                reply = await ann.request({"type": "publish", "room": room, "body": {"n": n}})
            except ConnectionClosed as exc:
                # The new epoch sends every member of the room off to recover, the publisher
                # too; which comes first, its ack or its 1011, is a race.
                code = exc.rcvd.code if exc.rcvd is not None else None
                ann, _ = await rejoin()
                return f"closed {code}"
            if reply["type"] == "ack":
                acked.append(reply["msg_id"])
                offsets.append(reply["offset"])
                return "ack"
            assert reply["type"] == "error" and reply["code"] == "unavailable", reply
            return "unavailable"

        for n in range(5):
            assert await send(n) == "ack"
        assert [m["offset"] for m in await bob.messages(room, 5)] == [1, 2, 3, 4, 5]

        own_cluster.kill(own_cluster.master_of(f"collab:{{room:{room}}}:meta"))
        outcomes: list[str] = []
        deadline = time.monotonic() + 30
        while not outcomes or outcomes[-1] != "ack":
            assert time.monotonic() < deadline, f"no ack within 30 s: {outcomes[-5:]}"
            outcomes.append(await send(100 + len(outcomes)))
            await asyncio.sleep(0.05)
        assert "unavailable" in outcomes
        assert {o for o in outcomes if o.startswith("closed")} <= {"closed 1011"}, outcomes

        # The new epoch voids every position: both members are told to reconnect and recover.
        assert await bob.closed_with(timeout=15) == 1011
        since = {"epoch": epoch, "offset": 5}
        deadline = time.monotonic() + 30
        bob, rejoined = await rejoin(bob_token, since=since)
        assert rejoined["recovered"] is False and rejoined["epoch"] != epoch
        # The new epoch counts from 1 again: the last ack is its newest message. A publish cut
        # off by its publisher's 1011 may have taken an offset before it.
        closed = sum(1 for o in outcomes if o.startswith("closed"))
        assert rejoined["offset"] == offsets[-1]
        assert 1 <= offsets[-1] <= 1 + closed

        stored = stored_msg_ids(tmp_path / "cluster.db", room)
        # Every acknowledged message once (a publish whose ack was cut off by the 1011 may be
        # stored too: delivered, never acknowledged).
        assert set(acked) <= stored and len(acked) == len(set(acked)) >= 6
    finally:
        stop_nodes([a, b])


def presence_leave_of(user_id: str, room: str) -> Callable[[Frame], bool]:
    return lambda f: (
        f.get("type") == "presence_diff"
        and f["room"] == room
        and user_id in {entry["user"]["id"] for entry in f["leaves"]}
    )


async def test_a_killed_hub_nodes_users_leave_presence_on_the_other_two(
    redis_cluster: RedisClusterProcesses, hubs: list[ServerProcess]
) -> None:
    """Ann, bob and carol, each on a node of their own, in a room on every shard: each sees
    the three present. Carol's node is SIGKILLed (it never says goodbye): within the presence
    timeout ann and bob, on the other nodes, are told she left (`presence_diff` with her in
    `leaves`, 0 connections) in every room, presence no longer has her, and the rooms work on.
    (The fixture starts the killed node again for any test that runs after this one.)"""
    a, b, c = hubs
    rooms = list(rooms_on_every_shard(redis_cluster, hub_channel).values())
    (ann_token, ann_id), (bob_token, bob_id), (carol_token, carol_id) = (
        guest(node.url, name) for node, name in zip(hubs, ["ann", "bob", "carol"], strict=True)
    )
    ann = await joined_everywhere(a, ann_token, rooms)
    bob = await joined_everywhere(b, bob_token, rooms)
    await joined_everywhere(c, carol_token, rooms)
    for room in rooms:
        for member in (ann, bob):
            assert await presence_of(member, room) == {ann_id: 1, bob_id: 1, carol_id: 1}

    c.kill()  # SIGKILL, by its PID
    killed = time.monotonic()
    for room in rooms:
        for member in (ann, bob):
            leave = await member.wait_for(
                presence_leave_of(carol_id, room), timeout=PRESENCE_TIMEOUT + 4
            )
            assert {"user": {"id": carol_id, "name": "carol"}, "connections": 0} in leave["leaves"]
            assert carol_id not in {entry["user"]["id"] for entry in leave["joins"]}
    print(
        f"carol's leave reached both nodes in every room {time.monotonic() - killed:.1f}s"
        f" after the kill (presence timeout {PRESENCE_TIMEOUT}s)"
    )
    for room in rooms:
        for member in (ann, bob):
            assert await presence_of(member, room) == {ann_id: 1, bob_id: 1}
        ack = await ann.request({"type": "publish", "room": room, "body": {"after": "kill"}})
        assert ack["type"] == "ack", ack
        for member in (ann, bob):
            assert (await member.event("message", room=room))["offset"] == ack["offset"]
    gone = {
        entry["user"]["id"]
        for frame in ann.frames + bob.frames
        if frame.get("type") == "presence_diff"
        for entry in frame["leaves"]
    }
    assert gone == {carol_id}, "the living were never announced as gone"
