"""The python-socketio peer: an `AsyncServer` in ASGI mode on uvicorn, one room, acks.

Events: `join` (data: the room name) enters the room and acknowledges; `publish` (data:
`{"room", "body"}`) emits `message` to the room, then acknowledges with the offset. The
`message` data carries the same fields as a Collab `message` event.

    python -m loadtests.peers.socketio_server --port 9003
"""

from __future__ import annotations

from typing import Any

import socketio  # type: ignore[import-untyped]
import uvicorn

from loadtests.peers.common import message_fields, options

sio = socketio.AsyncServer(async_mode="asgi", cors_allowed_origins="*", transports=["websocket"])
app = socketio.ASGIApp(sio)
offsets: dict[str, int] = {}


@sio.on("join")  # type: ignore[untyped-decorator]
async def join(sid: str, room: str) -> dict[str, Any]:
    await sio.enter_room(sid, room)
    return {"room": room}


@sio.on("publish")  # type: ignore[untyped-decorator]
async def publish(sid: str, data: dict[str, Any]) -> dict[str, Any]:
    room = data["room"]
    offset = offsets.get(room, 0) + 1
    offsets[room] = offset
    await sio.emit("message", message_fields(room, offset, data["body"]), room=room)
    return {"room": room, "offset": offset}


def main() -> None:
    args = options("python-socketio peer")
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
