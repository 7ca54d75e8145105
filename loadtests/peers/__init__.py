"""Peer servers the fan-out benchmark compares Collab with, each as small as it can honestly be.

Every peer serves one workload: clients join a room, and a `publish` is broadcast to every
member of the room, then acknowledged to the publisher. The broadcast frame carries the same
fields as a Collab `message` event (room, offset, ids, user, body, time), so frame sizes match.

- `websockets_server`: plain `websockets` with `broadcast()`, the reference for latency and
  memory. Speaks the subset of Collab's protocol the benchmark uses (welcome, join, publish).
- `fastapi_server`: the naive FastAPI endpoint (a loop of `await ws.send_text` per member) on
  uvicorn. Same subset of the protocol.
- `socketio_server`: python-socketio (ASGI) on uvicorn; events `join` and `publish` with acks.
- `socketio_node/server.js`: the same on node's socket.io (`npm ci` in that folder: the
  versions its lockfile names).
"""

__all__: list[str] = []
