"""The AsyncAPI document: valid for the official parser, served as it is in the repository.

That every frame a server sends fits it is checked by every end-to-end test, through
`tests/wsclient.py` (see `tests/protocol_schema.py`).
"""

from __future__ import annotations

import subprocess

import httpx
import orjson
import pytest

from collab.app import ASYNCAPI, create_app
from collab.settings import Settings
from realtime.protocol import CloseCode, ErrorCode
from tests.jstools import JS, require_js_tools
from tests.protocol_schema import FrameNotInSchema, check_frame


def test_the_official_parser_accepts_the_document() -> None:
    node = require_js_tools()
    done = subprocess.run(
        [node, "tools/asyncapi-check.mjs", str(ASYNCAPI)],
        cwd=JS,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid: 2 channels" in done.stdout


async def test_served_at_asyncapi_json_even_without_api_docs(tmp_path: object) -> None:
    settings = Settings(
        env="test",
        database_url="sqlite+aiosqlite:///:memory:",
        secret_key="asyncapi-" + "k" * 40,
        api_docs=False,
    )
    app = create_app(settings)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        response = await http.get("/asyncapi.json")
        assert (await http.get("/openapi.json")).status_code == 404
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.content == ASYNCAPI.read_bytes()
    assert orjson.loads(response.content)["asyncapi"].startswith("3.")


def test_the_check_refuses_what_the_document_does_not_say() -> None:
    """The frame check is not vacuous: wrong types, missing and undocumented fields fail."""
    good = {"type": "pong", "id": 1}
    check_frame("/ws/chat", good)
    for bad in (
        {"type": "pong"},  # a reply without its id
        {"type": "pong", "id": 1, "extra": True},  # undocumented field
        {"type": "ack", "id": 1, "room": "r", "offset": "1", "msg_id": "x"},
        {"type": "error", "id": 1, "code": "unavailable", "message": "m", "outcome": "unknown"},
        {"type": "subscribed", "id": 1},  # a /ws/live reply on /ws/chat
    ):
        with pytest.raises(FrameNotInSchema):
            check_frame("/ws/chat", bad)
    check_frame(
        "/ws/chat",
        {
            "type": "error",
            "id": 1,
            "code": "unavailable",
            "message": "delivered, but storage did not confirm",
            "outcome": "unknown",
            "room": "r",
            "offset": 3,
            "msg_id": "01JABCDEFGHJKMNPQRSTVWXYZ0",
        },
    )


def test_the_document_names_every_close_and_error_code_of_the_server() -> None:
    document = orjson.loads(ASYNCAPI.read_bytes())
    for channel in document["channels"].values():
        assert {c["code"] for c in channel["x-close-codes"]} == {int(c) for c in CloseCode}
    codes = document["components"]["schemas"]["ErrorCode"]["enum"]
    assert set(codes) == {c.value for c in ErrorCode}
