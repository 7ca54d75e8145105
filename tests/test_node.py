"""`Node`, in-process over the memory backends with a recording send, as centrifuge's
`node_test.go` drives its node: every command's logic without a server process (the end-to-end
suites keep what needs one: sockets, several nodes, real services).

The publish path's promises about storage come first.

What a publisher is told must be the truth (issue 9): an ack only once storage has the
message; a message delivered but not confirmed answers `outcome: "unknown"` with its position;
a retry with the same `client_msg_id` stores the first message, never the retry's body
(issue 15); and whatever storage lost, the reconciler stores again from the window, or
counts as lost when the window no longer holds it.

The storage side here is a small in-memory double of the `MessageSink` and `StorageLedger`
interfaces; the real database and Celery paths are attacked end to end in
`test_storage_guarantee.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from realtime import protocol as p
from realtime.broker_memory import MemoryBroker
from realtime.connection import Connection
from realtime.hub import SLICE
from realtime.node import Node
from realtime.presence_memory import MemoryPresence
from realtime.reconciler import Reconciler
from realtime.storage import (
    HistoryReader,
    MessageRefused,
    MessageSink,
    RestoreOutcome,
    RoomAccess,
    SinkUnavailable,
    StorageLedger,
    StoredMessage,
)
from realtime.types import UserInfo


class Store(MessageSink, StorageLedger):
    """Durable storage in a dict. `mode`: "ok", "fail" (unavailable), "refuse" (a bad row) or
    "drop" (acknowledges and loses the message, as kombu's Redis transport can)."""

    def __init__(self) -> None:
        self.rows: dict[tuple[str, str, int], StoredMessage] = {}
        self.mode = "ok"

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def store(self, message: StoredMessage) -> None:
        if self.mode == "fail":
            raise SinkUnavailable("storage is away")
        if self.mode == "refuse":
            raise MessageRefused("[22021] invalid byte sequence")
        if self.mode == "ok":
            self.rows.setdefault((message.room, message.epoch, message.offset), message)

    async def count_accounted(self, room: str, epoch: str, first: int, last: int) -> int:
        return len(await self.accounted(room, epoch, first, last))

    async def accounted(self, room: str, epoch: str, first: int, last: int) -> set[int]:
        return {o for (r, e, o) in self.rows if r == room and e == epoch and first <= o <= last}

    async def restore(self, messages: list[StoredMessage]) -> RestoreOutcome:
        before = len(self.rows)
        for m in messages:
            self.rows.setdefault((m.room, m.epoch, m.offset), m)
        return RestoreOutcome(written=len(self.rows) - before, set_aside=0)


class NoHistory(HistoryReader):
    async def page(
        self, room: str, epoch: str | None, **_: Any
    ) -> tuple[list[StoredMessage], bool]:
        return [], False

    async def last_position(self, room: str) -> tuple[str, int] | None:
        return None


class Open(RoomAccess):
    async def can_access(self, room: str, user: UserInfo) -> bool:
        return True


class Member:
    """A connection whose frames are recorded instead of written to a socket."""

    def __init__(self, node: Node, name: str) -> None:
        self.frames: list[dict[str, Any]] = []

        async def send(event: dict[str, Any]) -> None:
            if event["type"] == "websocket.send":
                self.frames.append(orjson.loads(event["text"]))

        self.conn = Connection(
            f"c-{name}", UserInfo(name, name), send, max_queue_bytes=1 << 20, rate=1e6, burst=10**6
        )
        self.node = node
        node.connect(self.conn)

    async def command(self, frame: dict[str, Any]) -> None:
        command = p.parse_command(orjson.dumps(frame), "chat", max_body_bytes=16384)
        try:
            reply = await self.node.handle(self.conn, command)
        except p.ProtocolError as exc:  # as the endpoint answers it
            reply = exc.frame()
        if reply:
            self.conn.reply(reply)

    async def reply_to(self, command_id: int) -> dict[str, Any]:
        for _ in range(200):
            for frame in self.frames:
                if frame.get("id") == command_id:
                    return frame
            await asyncio.sleep(0.005)
        raise AssertionError(f"no reply to {command_id}: {self.frames}")

    def messages(self) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == "message"]


@pytest.fixture
async def setup() -> AsyncIterator[tuple[Node, Store, MemoryBroker]]:
    store = Store()
    broker = MemoryBroker(history_window=3, max_unconfirmed=10)
    node = Node(
        node_id="n1",
        broker=broker,
        presence=MemoryPresence(),
        sink=store,
        history=NoHistory(),
        access=Open(),
        reconciler=Reconciler(broker, store, grace=0, interval=3600),
    )
    await node.start()
    try:
        yield node, store, broker
    finally:
        await node.close()


async def joined(node: Node, name: str, room: str = "r") -> Member:
    member = Member(node, name)
    await member.command({"type": "join", "id": 1, "room": room})
    assert (await member.reply_to(1))["type"] == "joined"
    return member


async def test_an_ack_means_stored(setup: tuple[Node, Store, MemoryBroker]) -> None:
    node, store, _ = setup
    ann = await joined(node, "ann")
    await ann.command({"type": "publish", "id": 2, "room": "r", "body": {"t": 1}})
    ack = await ann.reply_to(2)
    assert ack["type"] == "ack" and ack["offset"] == 1
    assert [m.msg_id for m in store.rows.values()] == [ack["msg_id"]]
    assert node.acknowledged == 1


@pytest.mark.parametrize(("mode", "code"), [("fail", "unavailable"), ("refuse", "internal")])
async def test_delivered_but_not_stored_says_so(
    setup: tuple[Node, Store, MemoryBroker], mode: str, code: str
) -> None:
    node, store, _ = setup
    ann, bob = await joined(node, "ann"), await joined(node, "bob")
    store.mode = mode
    await ann.command(
        {"type": "publish", "id": 2, "room": "r", "body": {"t": 1}, "client_msg_id": "x1"}
    )
    reply = await ann.reply_to(2)
    assert reply["type"] == "error" and reply["code"] == code
    # Not "not carried out": every member has it, and the reply names it.
    assert reply["outcome"] == "unknown" and reply["offset"] == 1 and reply["room"] == "r"
    assert [m["msg_id"] for m in bob.messages()] == [reply["msg_id"]]
    assert node.acknowledged == 0 and node.unconfirmed_replies == 1

    # The retry with the same client_msg_id is safe: the first message's ack, nothing resent.
    store.mode = "ok"
    await ann.command(
        {"type": "publish", "id": 3, "room": "r", "body": {"t": 1}, "client_msg_id": "x1"}
    )
    ack = await ann.reply_to(3)
    assert (ack["type"], ack["offset"], ack["msg_id"]) == ("ack", 1, reply["msg_id"])
    assert len(bob.messages()) == 1
    assert store.rows[("r", bob.messages()[0]["epoch"], 1)].msg_id == reply["msg_id"]


async def test_a_retry_stores_the_first_body_not_its_own(
    setup: tuple[Node, Store, MemoryBroker],
) -> None:
    node, store, _ = setup
    ann, bob = await joined(node, "ann"), await joined(node, "bob")
    store.mode = "fail"
    await ann.command(
        {"type": "publish", "id": 2, "room": "r", "body": {"v": "first"}, "client_msg_id": "k"}
    )
    assert (await ann.reply_to(2))["outcome"] == "unknown"
    store.mode = "ok"
    await ann.command(
        {"type": "publish", "id": 3, "room": "r", "body": {"v": "second"}, "client_msg_id": "k"}
    )
    assert (await ann.reply_to(3))["type"] == "ack"
    (stored,) = store.rows.values()
    assert stored.body == {"v": "first"} == bob.messages()[0]["body"]


async def test_the_reconciler_stores_what_storage_lost(
    setup: tuple[Node, Store, MemoryBroker],
) -> None:
    node, store, broker = setup
    ann = await joined(node, "ann")
    store.mode = "drop"  # acknowledged, then lost
    for i in range(5):
        await ann.command({"type": "publish", "id": 10 + i, "room": "r", "body": {"n": i}})
    acks = [await ann.reply_to(10 + i) for i in range(5)]
    assert all(a["type"] == "ack" for a in acks) and not store.rows
    # The window is 3, but nothing was confirmed stored: it still holds all five.
    assert node.reconciler is not None
    report = await node.reconciler.run_pass()
    assert report.restored == 5 and not report.lost
    assert sorted(o for (_, _, o) in store.rows) == [1, 2, 3, 4, 5]
    assert [store.rows[("r", m.epoch, m.offset)].msg_id for m in store.rows.values()] == [
        a["msg_id"] for a in acks
    ]
    mark = await broker.storage_mark("room:r")
    assert mark is not None and mark.stored == 5
    assert (await node.reconciler.run_pass()).restored == 0  # nothing twice


async def test_past_the_window_cap_a_loss_is_counted_never_skipped(
    setup: tuple[Node, Store, MemoryBroker],
) -> None:
    node, store, _ = setup
    ann = await joined(node, "ann")
    store.mode = "drop"
    for i in range(14):  # the window keeps at most 10 unconfirmed
        await ann.command({"type": "publish", "id": 10 + i, "room": "r", "body": {"n": i}})
        await ann.reply_to(10 + i)
    assert node.reconciler is not None
    report = await node.reconciler.run_pass()
    epoch = next(iter(store.rows))[1]
    assert report.lost == [("r", epoch, 1, 4)]
    assert node.reconciler.lost == 4 and report.restored == 10
    assert sorted(o for (_, _, o) in store.rows) == list(range(5, 15))


# --- the other commands -----------------------------------------------------------------------


async def test_commands_are_carried_out_and_answered(
    setup: tuple[Node, Store, MemoryBroker],
) -> None:
    node, _, _ = setup
    ann, bob = await joined(node, "ann"), await joined(node, "bob")
    await ann.command({"type": "ping", "id": 2})
    assert (await ann.reply_to(2))["type"] == "pong"
    await ann.command({"type": "presence", "id": 3, "room": "r"})
    members = (await ann.reply_to(3))["members"]
    assert sorted(m["user"]["id"] for m in members) == ["ann", "bob"]
    await ann.command({"type": "typing", "room": "r"})
    for _ in range(100):
        if any(f.get("type") == "typing" for f in bob.frames):
            break
        await asyncio.sleep(0.005)
    assert [f["user"]["id"] for f in bob.frames if f.get("type") == "typing"] == ["ann"]
    assert not [f for f in ann.frames if f.get("type") == "typing"]  # not to the typist
    await ann.command({"type": "history", "id": 4, "room": "r"})
    history = await ann.reply_to(4)
    assert history["type"] == "history" and history["messages"] == []
    await ann.command({"type": "leave", "id": 5, "room": "r"})
    assert (await ann.reply_to(5))["type"] == "left"
    await ann.command({"type": "publish", "id": 6, "room": "r", "body": {}})
    refused = await ann.reply_to(6)
    assert (refused["type"], refused["code"]) == ("error", "not_joined")


async def test_every_command_type_has_a_handler() -> None:
    """`Node.handle` matches every member of `protocol.Command` (mypy checks the match is
    exhaustive; this checks each command class is named in it)."""
    import inspect
    import typing

    source = inspect.getsource(Node.handle)
    for command in typing.get_args(p.Command):
        assert f"case p.{command.__name__}()" in source, command


async def test_the_presence_sweep_keeps_every_connection_of_a_large_room_present() -> None:
    """The sweep refreshes a slice of connections per loop turn (`realtime.hub.in_slices`):
    every slice must be refreshed, or the connections past the first would expire while open."""
    presence = MemoryPresence(timeout=0.6)  # swept every 0.2 s; unrefreshed entries go in 0.6 s
    node = Node(
        node_id="n1",
        broker=MemoryBroker(),
        presence=presence,
        sink=Store(),
        history=NoHistory(),
        access=Open(),
    )
    await node.start()
    try:
        members = [await joined(node, f"u{i}") for i in range(2 * SLICE + 10)]
        await asyncio.sleep(1.5)  # seven sweeps, more than two timeouts
        present = await presence.members("r")
        assert len(present) == len(members)
        diffs = [f for f in members[0].frames if f.get("type") == "presence_diff"]
        assert diffs and not any(diff["leaves"] for diff in diffs)  # nobody announced as gone
    finally:
        await node.close()
