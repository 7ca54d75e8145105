"""Server frames checked against the AsyncAPI document (`collab/asyncapi.json`).

`tests/wsclient.py` passes every frame it receives through `check_frame`, so every end-to-end
test also proves that what the server sent is what the document says. The check is stricter
than the document: the document leaves objects open (clients must ignore fields added later),
while here an undocumented field fails, so nothing the server sends goes undocumented.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft7Validator
from jsonschema.exceptions import best_match

DOCUMENT = Path(__file__).resolve().parent.parent / "collab" / "asyncapi.json"
# Endpoint path -> the channel that describes it.
CHANNELS = {"/ws/chat": "chat", "/ws/live": "live"}


class FrameNotInSchema(AssertionError):
    """A frame the server sent that the AsyncAPI document does not allow."""


def _resolve(document: dict[str, Any], pointer: str) -> Any:
    node: Any = document
    for part in pointer.removeprefix("#/").split("/"):
        node = node[part]
    return node


def _closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to other fields."""
    if isinstance(schema, dict):
        schema = {key: _closed(value) for key, value in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_closed(value) for value in schema]
    return schema


@functools.cache
def _validators(channel: str) -> dict[str, Draft7Validator]:
    """The channel's server frames by `type`: replies of `receive` operations, and the
    messages of `send` operations (AsyncAPI's actions are the server's point of view)."""
    document = orjson.loads(DOCUMENT.read_bytes())
    root = {"components": _closed(copy.deepcopy(document["components"]))}
    validators: dict[str, Draft7Validator] = {}
    for operation in document["operations"].values():
        if operation["channel"]["$ref"] != f"#/channels/{channel}":
            continue
        refs = (
            operation["messages"]
            if operation["action"] == "send"
            else operation.get("reply", {}).get("messages", [])
        )
        for message_ref in refs:
            message = _resolve(document, _resolve(document, message_ref["$ref"])["$ref"])
            schema_ref = message["payload"]["$ref"]
            kind = _resolve(document, schema_ref)["properties"]["type"]["const"]
            validators[kind] = Draft7Validator({**root, "$ref": schema_ref})
    return validators


def check_frame(path: str, frame: Any) -> None:
    """Raise `FrameNotInSchema` unless `frame`, received on `path`, fits the document."""
    channel = CHANNELS.get(path)
    if channel is None:
        return
    kind = frame.get("type") if isinstance(frame, dict) else None
    validator = _validators(channel).get(kind) if isinstance(kind, str) else None
    if validator is None:
        raise FrameNotInSchema(f"{path}: no server frame of type {kind!r} is documented: {frame}")
    error = best_match(validator.iter_errors(frame))
    if error is not None:
        raise FrameNotInSchema(
            f"{path}: {kind} frame does not fit the AsyncAPI document at "
            f"{'/'.join(map(str, error.absolute_path)) or '(top)'}: {error.message}\n{frame}"
        )
