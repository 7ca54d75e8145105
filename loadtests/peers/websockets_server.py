"""The reference peer: plain `websockets` (asyncio API) and its `broadcast()`.

No queues, no acknowledgement of storage, no presence: the least a Python server can do to
fan a message out, which makes it the yardstick for latency and memory per connection.
Speaks the part of Collab's protocol the benchmark uses: `welcome`, `join` -> `joined`,
`publish` -> a `message` event to every member, then `ack`.

    python -m loadtests.peers.websockets_server --port 9001
"""

from __future__ import annotations

import asyncio
import signal

import orjson
from websockets.asyncio.server import ServerConnection, broadcast, serve

from loadtests.peers.common import message_frame, options, welcome

rooms: dict[str, set[ServerConnection]] = {}
offsets: dict[str, int] = {}


async def handler(ws: ServerConnection) -> None:
    joined: set[str] = set()
    await ws.send(welcome())
    try:
        async for raw in ws:
            command = orjson.loads(raw)
            kind, command_id = command.get("type"), command.get("id")
            if kind == "join":
                room = command["room"]
                rooms.setdefault(room, set()).add(ws)
                joined.add(room)
                reply = {"type": "joined", "id": command_id, "room": room}
                await ws.send(orjson.dumps(reply).decode())
            elif kind == "publish":
                room = command["room"]
                offset = offsets.get(room, 0) + 1
                offsets[room] = offset
                broadcast(rooms.get(room, ()), message_frame(room, offset, command["body"]))
                ack = {"type": "ack", "id": command_id, "room": room, "offset": offset}
                await ws.send(orjson.dumps(ack).decode())
            elif kind == "ping":
                await ws.send(orjson.dumps({"type": "pong", "id": command_id}).decode())
    finally:
        for room in joined:
            members = rooms.get(room)
            if members is not None:
                members.discard(ws)


async def main() -> None:
    args = options("websockets broadcast() peer")
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(
        handler, args.host, args.port, compression=None, max_size=64 * 1024, backlog=4096
    ):
        await stop


if __name__ == "__main__":
    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())
