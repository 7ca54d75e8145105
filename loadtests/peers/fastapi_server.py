"""The naive peer: a FastAPI WebSocket endpoint on uvicorn, as a tutorial would write it.

Members of a room are a set of `WebSocket`s and a publish is a loop of `await send_text` over
them: no bounded queue, and one slow member delays every member after it. This is the
baseline Collab's memory per connection is held to. Same protocol subset as
`websockets_server`.

    python -m loadtests.peers.fastapi_server --port 9002
"""

from __future__ import annotations

import orjson
import uvicorn
from fastapi import FastAPI, WebSocket, WebSocketDisconnect

from loadtests.peers.common import message_frame, options, welcome

app = FastAPI()
rooms: dict[str, set[WebSocket]] = {}
offsets: dict[str, int] = {}


@app.websocket("/ws")
async def endpoint(ws: WebSocket) -> None:
    await ws.accept()
    joined: set[str] = set()
    await ws.send_text(welcome())
    try:
        while True:
            command = orjson.loads(await ws.receive_text())
            kind, command_id = command.get("type"), command.get("id")
            if kind == "join":
                room = command["room"]
                rooms.setdefault(room, set()).add(ws)
                joined.add(room)
                await ws.send_text(
                    orjson.dumps({"type": "joined", "id": command_id, "room": room}).decode()
                )
            elif kind == "publish":
                room = command["room"]
                offset = offsets.get(room, 0) + 1
                offsets[room] = offset
                frame = message_frame(room, offset, command["body"])
                for member in list(rooms.get(room, ())):
                    try:
                        await member.send_text(frame)
                    except (WebSocketDisconnect, RuntimeError):
                        rooms[room].discard(member)
                ack = {"type": "ack", "id": command_id, "room": room, "offset": offset}
                await ws.send_text(orjson.dumps(ack).decode())
            elif kind == "ping":
                await ws.send_text(orjson.dumps({"type": "pong", "id": command_id}).decode())
    except WebSocketDisconnect:
        pass
    finally:
        for room in joined:
            rooms.get(room, set()).discard(ws)


def main() -> None:
    args = options("naive FastAPI WebSocket peer")
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level="warning",
        ws=args.ws,
        ws_per_message_deflate=False,
        backlog=4096,
    )


if __name__ == "__main__":
    main()
