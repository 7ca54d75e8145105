"""What the Python peers share: command-line options and the broadcast frame's shape."""

from __future__ import annotations

import argparse
import itertools
import os
import time
from typing import Any

import orjson

USER = {"id": "1", "name": "bench"}
_counter = itertools.count(1)


def options(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--ws",
        default="websockets-sansio",
        help="uvicorn's WebSocket implementation (uvicorn-based peers only)",
    )
    return parser.parse_args()


def msg_id() -> str:
    """Unique and about as long as Collab's ULID-style ids, so frames are the same size."""
    return f"{os.getpid():08x}{next(_counter):018x}"


def timestamp() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def message_fields(room: str, offset: int, body: Any) -> dict[str, Any]:
    """The fields of a Collab `message` event (without `type`/`epoch`): same content, same size."""
    return {
        "room": room,
        "offset": offset,
        "msg_id": msg_id(),
        "client_msg_id": None,
        "user": USER,
        "body": body,
        "ts": timestamp(),
    }


def message_frame(room: str, offset: int, body: Any) -> str:
    return orjson.dumps(
        {"type": "message", "epoch": "bench", **message_fields(room, offset, body)}
    ).decode()


def welcome() -> str:
    return orjson.dumps({"type": "welcome", "session": msg_id(), "user": USER}).decode()
