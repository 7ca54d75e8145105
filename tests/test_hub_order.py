"""The hub's fan-out order, in-process: what the cluster tests can only hit by chance.

On a node, a room's publications arrive on the broker's pub/sub connection while a joining
member reads the room's position on another connection, so the position can name offsets
that this node has not delivered yet. Those are still on their way and must reach the
members that were already there.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from realtime.broker import Publication
from realtime.connection import Connection
from realtime.hub import Hub
from realtime.types import Position, UserInfo

CHANNEL = "room:r"


class QuietBroker:
    """The little of a broker the hub calls here; the test plays the pub/sub itself."""

    async def subscribe(self, channel: str) -> None:
        return None

    async def unsubscribe(self, channel: str) -> None:
        return None

    async def recent(self, channel: str, since: Position) -> list[Publication] | None:
        return None  # the window cannot help: any recovery would end in a reset


def member(name: str) -> tuple[Connection, list[int]]:
    offsets: list[int] = []

    async def send(event: dict[str, Any]) -> None:
        if event["type"] == "websocket.send":
            offsets.append(orjson.loads(event["text"])["offset"])
        else:
            offsets.append(-1)  # a close: the member was sent off

    conn = Connection(
        name, UserInfo(name, name), send, max_queue_bytes=1 << 20, rate=100.0, burst=100
    )
    return conn, offsets


def publication(offset: int, epoch: str = "e1") -> Publication:
    frame = orjson.dumps({"type": "message", "epoch": epoch, "offset": offset})
    return Publication(CHANNEL, epoch, offset, frame)


async def test_a_join_does_not_skip_publications_still_on_their_way() -> None:
    hub = Hub(QuietBroker())  # type: ignore[arg-type]
    old, old_got = member("old")
    await hub.add_member(CHANNEL, old)
    hub.activate(CHANNEL, old, Position("e1", 10))
    hub.on_publication(publication(11))

    # The newcomer read the position after 12 and 13 were published, before they got here.
    new, new_got = member("new")
    await hub.add_member(CHANNEL, new)
    hub.activate(CHANNEL, new, Position("e1", 13))
    for offset in (12, 13, 14):
        hub.on_publication(publication(offset))

    assert old_got == [11, 12, 13, 14]
    assert new_got == [14]
    await hub.close()


async def test_a_gap_is_still_noticed_after_a_join() -> None:
    """What the hub never received is recovered or, past the window, sent off with 1011,
    whether or not someone joined meanwhile."""
    hub = Hub(QuietBroker())  # type: ignore[arg-type]
    old, old_got = member("old")
    await hub.add_member(CHANNEL, old)
    hub.activate(CHANNEL, old, Position("e1", 10))
    new, _ = member("new")
    await hub.add_member(CHANNEL, new)
    hub.activate(CHANNEL, new, Position("e1", 13))
    hub.on_publication(publication(14))  # 11 to 13 never came: a gap for the old member
    deadline = asyncio.get_running_loop().time() + 5
    while not old_got and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    assert old_got == [-1], "sent off to recover, never handed 14 across the gap"
    await hub.close()


async def test_two_first_joiners_at_once_both_get_everything_after_their_floor() -> None:
    """Two members join an empty room together and read different positions; the one that
    activates first must not make the hub drop what the other still needs."""
    hub = Hub(QuietBroker())  # type: ignore[arg-type]
    first, first_got = member("first")
    second, second_got = member("second")
    await hub.add_member(CHANNEL, first)
    await hub.add_member(CHANNEL, second)
    hub.activate(CHANNEL, first, Position("e1", 10))  # read after 9 and 10 were published
    for offset in (9, 10, 11):  # 9 and 10 were still on their way
        hub.on_publication(publication(offset))
    hub.activate(CHANNEL, second, Position("e1", 8))  # read before them
    hub.on_publication(publication(12))

    assert first_got == [11, 12]
    assert second_got == [9, 10, 11, 12]
    await hub.close()


class FailedOverBroker(QuietBroker):
    """After a failover: the window holds the new epoch ("e2") only; "e1" is gone."""

    def __init__(self) -> None:
        self.window: list[Publication] = []

    def publish(self, offset: int) -> Publication:
        self.window.append(publication(offset, epoch="e2"))
        return self.window[-1]

    async def recent(self, channel: str, since: Position) -> list[Publication] | None:
        if since.epoch != "e2":
            return None
        return [p for p in self.window if p.offset > since.offset]


class AskedWindowBroker(FailedOverBroker):
    """The same, with a window that answers only when the test lets it: what arrives while
    a recovery asks is seen to arrive then."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()
        self.answer = asyncio.Event()

    async def recent(self, channel: str, since: Position) -> list[Publication] | None:
        self.asked.set()
        await self.answer.wait()
        return await super().recent(channel, since)


async def active(hub: Hub, name: str, epoch: str, offset: int) -> tuple[Connection, list[int]]:
    conn, got = member(name)
    await hub.add_member(CHANNEL, conn)
    hub.activate(CHANNEL, conn, Position(epoch, offset))
    return conn, got


async def settle(condition: Any = lambda: True) -> None:
    """Let spawned recoveries and closes run (they are tasks)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        await asyncio.sleep(0.02)
        if condition() or asyncio.get_running_loop().time() > deadline:
            return


async def test_a_member_joining_in_the_new_epoch_is_not_sent_off_for_the_old_one() -> None:
    """A master failover gives a room a new epoch. A node that has not heard of it yet still
    has the room's old stream when a client (sent off by another node) rejoins here and reads
    the new position; then the node hears of the switch. The old stream's members are sent off
    to recover; the newcomer keeps its connection and gets every message of the new epoch after
    its floor: the ones this node dropped while nobody followed the stream, and the ones its
    pub/sub never saw, from the broker's window, then the live ones, in order, once each."""
    broker = FailedOverBroker()
    hub = Hub(broker)  # type: ignore[arg-type]
    _, old_got = await active(hub, "old", "e1", 5)
    hub.on_publication(publication(6))
    new, new_got = member("new")
    await hub.add_member(CHANNEL, new)  # pending: its reply is not out yet
    hub.on_publication(publication(7))  # held for it, in the old stream
    broker.publish(1)  # never reached this node (its pub/sub was on the dead master)
    hub.on_publication(broker.publish(2))  # the node hears of the new epoch
    hub.on_publication(broker.publish(3))
    hub.activate(CHANNEL, new, Position("e2", 0))  # read before 1 was published
    hub.on_publication(broker.publish(4))
    await settle(lambda: len(new_got) >= 4)
    hub.on_publication(broker.publish(5))

    assert old_got == [6, 7, -1], "the old stream's member is sent off to recover"
    assert new_got == [1, 2, 3, 4, 5], "the new stream above its floor, nothing old, no repeat"
    assert not new.closing
    await hub.close()


async def test_a_member_joining_in_the_voided_epoch_is_sent_off_too(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The same switch, but the newcomer read its position before the failover: its reply
    names the old epoch, so it is sent off to recover like the members already there. The
    operator's log says which channel and why."""
    broker = FailedOverBroker()
    hub = Hub(broker)  # type: ignore[arg-type]
    _, old_got = await active(hub, "old", "e1", 5)
    new, new_got = member("new")
    await hub.add_member(CHANNEL, new)
    hub.on_publication(broker.publish(1))
    hub.activate(CHANNEL, new, Position("e1", 5))
    hub.on_publication(broker.publish(2))
    await settle()

    assert old_got == [-1]
    assert new_got == [-1], "a reply in the voided epoch is void: sent off, handed nothing"
    assert f"channel {CHANNEL} lost continuity (the broker started a new epoch e2)" in caplog.text
    await hub.close()


async def test_a_failed_recovery_spares_a_joiner_already_in_the_new_epoch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The other way a node learns of a failover: its pub/sub moves to the new master and the
    gap recovery finds the old epoch gone from the window. A member joining meanwhile with the
    new epoch's position keeps its connection and gets what follows it, including what came
    in while the recovery was asking."""
    broker = AskedWindowBroker()
    hub = Hub(broker)  # type: ignore[arg-type]
    _, old_got = await active(hub, "old", "e1", 5)
    new, new_got = member("new")
    await hub.add_member(CHANNEL, new)
    broker.publish(1)
    hub.on_resubscribed([CHANNEL])  # recovery asks the window, which has no e1 any more
    await broker.asked.wait()
    hub.on_publication(broker.publish(2))  # arrives while it asks: backlog, then dropped
    broker.answer.set()
    await settle(lambda: bool(old_got))
    hub.activate(CHANNEL, new, Position("e2", 1))
    hub.on_publication(broker.publish(3))
    await settle(lambda: len(new_got) >= 2)

    assert old_got == [-1]
    assert new_got == [2, 3]
    assert "lost continuity (the broker's window no longer holds offset 6)" in caplog.text
    await hub.close()


async def test_a_second_joiner_below_the_new_start_is_sent_off() -> None:
    """Two members join across the switch. The first to activate sets where the node's new
    stream starts; the other, if its position is below that start, could not be given what
    lies between (dropped before the start), so it is sent off to recover instead; at or
    above the start it is kept and misses nothing."""
    broker = FailedOverBroker()
    hub = Hub(broker)  # type: ignore[arg-type]
    await active(hub, "old", "e1", 5)
    low, low_got = member("low")
    high, high_got = member("high")
    keen, keen_got = member("keen")
    for conn in (low, high, keen):
        await hub.add_member(CHANNEL, conn)
    broker.publish(1)
    hub.on_publication(broker.publish(2))  # the switch
    hub.on_publication(broker.publish(3))  # dropped: nobody follows the stream yet
    hub.activate(CHANNEL, high, Position("e2", 2))  # the new start
    hub.activate(CHANNEL, low, Position("e2", 1))  # read before the start
    await settle(lambda: bool(high_got))
    hub.activate(CHANNEL, keen, Position("e2", 3))
    hub.on_publication(broker.publish(4))

    assert low_got == [-1]
    assert high_got == [3, 4]
    assert keen_got == [4]
    await hub.close()
