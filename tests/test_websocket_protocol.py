"""The one-parse handshake (`collab.websocket_protocol`) answers exactly as uvicorn's own.

Outside clients see only bytes, so each case here sends the same request to two real uvicorn
servers on loopback, one with uvicorn's `websockets-sansio` protocol and one with Collab's,
and compares what comes back: status, headers (the date aside) and the frames of an app that
reports the scope it was given. Refusals must come back byte for byte as before, since they go
to `websockets`' own handshake; a well-formed upgrade must give the same 101 and scope.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import pytest
import uvicorn
from uvicorn.config import Config
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from uvicorn.server import ServerState
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from collab.websocket_protocol import (
    CHECKED_UVICORN,
    CollabWebSocketProtocol,
    accept_key,
    protocol_classes,
)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Accepts, refuses or answers in HTTP as the path says; reports its scope in a frame."""
    if scope["type"] == "http":  # a request that did not upgrade
        await send(
            {"type": "http.response.start", "status": 426, "headers": [(b"content-length", b"14")]}
        )
        await send({"type": "http.response.body", "body": b"WebSocket only"})
        return
    assert (await receive())["type"] == "websocket.connect"
    path = scope["path"]
    if path == "/deny":
        await send({"type": "websocket.close", "code": 1008})
        return
    if path == "/http":
        await send(
            {
                "type": "websocket.http.response.start",
                "status": 409,
                "headers": [(b"x-why", b"busy")],
            }
        )
        await send({"type": "websocket.http.response.body", "body": b"come back later"})
        return
    if path == "/crash":
        raise RuntimeError("the app failed before its accept")
    if path == "/slow":  # the client's early frames arrive before the accept
        await asyncio.sleep(0.3)
    offered = scope["subprotocols"]
    await send(
        {
            "type": "websocket.accept",
            "subprotocol": "chat" if "chat" in offered else None,
            "headers": [(b"X-Extra", b"yes")] if path == "/headers" else [],
        }
    )
    report = {
        key: scope[key]
        for key in ("path", "query_string", "raw_path", "subprotocols", "scheme", "http_version")
    }
    report["headers"] = [[name.decode(), value.decode()] for name, value in scope["headers"]]
    await send({"type": "websocket.send", "text": json.dumps(report, default=bytes.decode)})
    message = await receive()
    if message["type"] == "websocket.receive":
        await send({"type": "websocket.send", "text": "echo:" + message["text"]})
        await send({"type": "websocket.close", "code": 4000, "reason": "done"})


@pytest.fixture
async def servers() -> AsyncIterator[dict[str, int]]:
    """Two uvicorn servers on loopback, uvicorn's protocols and Collab's: name -> port."""
    http, ws = protocol_classes()
    running: dict[str, tuple[uvicorn.Server, asyncio.Task[None]]] = {}
    for name, (http_class, ws_class) in {
        "uvicorn": ("httptools", "websockets-sansio"),
        "collab": (http, ws),
    }.items():
        config = Config(
            app,
            host="127.0.0.1",
            port=0,
            http=http_class,
            ws=ws_class,
            ws_per_message_deflate=False,
            lifespan="off",
            log_level="warning",
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        running[name] = (server, task)
    try:
        yield {
            name: server.servers[0].sockets[0].getsockname()[1]
            for name, (server, _) in running.items()
        }
    finally:
        for server, _task in running.values():
            server.should_exit = True
        await asyncio.gather(*(task for _, task in running.values()))


KEY = base64.b64encode(os.urandom(16)).decode()


def upgrade(
    path: str = "/ws?x=1", *, method: str = "GET", version: str = "1.1", **extra: str
) -> bytes:
    """An upgrade request; `extra` replaces (or with None, drops) a header: Sec_WebSocket_Key."""
    headers = {
        "Host": "localhost",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": KEY,
        "Sec-WebSocket-Version": "13",
    }
    for name, value in extra.items():
        headers[name.replace("_", "-")] = value
    lines = [f"{method} {path} HTTP/{version}"]
    lines += [f"{name}: {value}" for name, value in headers.items() if value != "DROP"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def frames_in(data: bytes) -> list[Any]:
    """The whole server frames in `data`: texts (JSON decoded), then ("close", payload)."""
    stream = StreamReader()
    stream.feed_data(data)
    stream.feed_eof()
    found: list[Any] = []
    while True:
        parser = Frame.parse(stream.read_exact, mask=False)
        try:
            while True:
                next(parser)
        except StopIteration as done:
            frame = done.value
        except EOFError:
            return found
        if frame.opcode is Opcode.CLOSE:
            found.append(("close", frame.data))
        else:
            text = frame.data.decode()
            found.append(json.loads(text) if text.startswith("{") else text)


async def exchange(port: int, request: bytes, early: bytes = b"") -> tuple[list[str], list[Any]]:
    """The response's head (status line and headers, the date left out) and what follows:
    after a 101, a text frame "hi" goes out and the frames that come back are parsed (the
    app reports its scope, echoes, closes); after anything else, the body. `early` goes out
    0.1 s after the request, before any answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        if early:
            await asyncio.sleep(0.1)
            writer.write(early)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        lines = [
            line
            for line in head.decode("latin-1").split("\r\n")
            if line and not line.lower().startswith("date:")
        ]
        if " 101 " not in lines[0]:
            length = [
                int(line.split(":")[1])
                for line in lines
                if line.lower().startswith("content-length:")
            ]
            return lines, [await asyncio.wait_for(reader.readexactly(length[0]), 5)]
        writer.write(Frame(Opcode.TEXT, b"hi").serialize(mask=True))
        data = b""
        while not any(isinstance(f, tuple) for f in frames_in(data)):
            chunk = await asyncio.wait_for(reader.read(65536), 5)
            assert chunk, f"closed without a close frame after {data!r}"
            data += chunk
        writer.write(Frame(Opcode.CLOSE, b"\x0f\xa0").serialize(mask=True))
        data += await asyncio.wait_for(reader.read(), 5)  # the server closes the TCP connection
        return lines, frames_in(data)
    finally:
        writer.close()


CASES = {
    "plain upgrade, echo and close": upgrade(),
    "path escapes and a query": upgrade("/a%20b/%C3%A9?q=%20&r=2"),
    "subprotocols offered": upgrade(Sec_WebSocket_Protocol="a, chat"),
    "an app header on the accept": upgrade("/headers"),
    "Connection with keep-alive too": upgrade(Connection="keep-alive, Upgrade"),
    "upgrade token in capitals": upgrade(Upgrade="WebSocket"),
    "refused before accept: 403": upgrade("/deny"),
    "an HTTP answer from the app": upgrade("/http"),
    "the app fails before accept: 500": upgrade("/crash"),
    "no key": upgrade(Sec_WebSocket_Key="DROP"),
    "a key of 15 bytes": upgrade(Sec_WebSocket_Key=base64.b64encode(b"x" * 15).decode()),
    "a key that is not base64": upgrade(Sec_WebSocket_Key="!" * 24),
    "version 8": upgrade(Sec_WebSocket_Version="8"),
    "no version": upgrade(Sec_WebSocket_Version="DROP"),
    "Connection without upgrade": upgrade(Connection="keep-alive"),
    "POST": upgrade(method="POST"),
    "HTTP/1.0": upgrade(version="1.0"),
}


@pytest.mark.parametrize("case", list(CASES))
async def test_every_answer_is_uvicorns(servers: dict[str, int], case: str) -> None:
    stock = await exchange(servers["uvicorn"], CASES[case])
    ours = await exchange(servers["collab"], CASES[case])
    assert ours == stock


EARLY = {
    "a ping and a text": Frame(Opcode.PING, b"p").serialize(mask=True)
    + Frame(Opcode.TEXT, b"early").serialize(mask=True),
    "a close": Frame(Opcode.CLOSE, b"\x03\xe8").serialize(mask=True),
    "an unmasked frame": Frame(Opcode.TEXT, b"bad").serialize(mask=False),
    "a reserved opcode": b"\x83\x80" + b"\0" * 4,
    "a frame over the size limit": Frame(Opcode.TEXT, b"x" * (1 << 21)).serialize(mask=True),
}


@pytest.mark.parametrize("case", list(EARLY))
async def test_frames_before_the_accept_are_handled_as_before(
    servers: dict[str, int], case: str
) -> None:
    """A client that does not wait for the 101: whatever it sends, the same outcome (for a
    close or a broken frame: the connection dropped with nothing written), and the server
    goes on serving everyone else."""

    async def outcome(port: int) -> object:
        try:
            return await exchange(port, upgrade("/slow"), EARLY[case])
        except asyncio.IncompleteReadError as exc:
            return ("dropped", exc.partial)

    stock = await outcome(servers["uvicorn"])
    assert await outcome(servers["collab"]) == stock
    head, frames = await exchange(servers["collab"], upgrade())
    assert head[0] == "HTTP/1.1 101 Switching Protocols" and frames[1] == "echo:hi"


async def test_a_doubled_key_is_refused_as_before(servers: dict[str, int]) -> None:
    request = upgrade().replace(b"\r\n\r\n", f"\r\nSec-WebSocket-Key: {KEY}\r\n\r\n".encode())
    stock = await exchange(servers["uvicorn"], request)
    assert await exchange(servers["collab"], request) == stock
    assert stock[0][0].startswith("HTTP/1.1 400"), stock


async def test_the_accept_is_rfc_6455s(servers: dict[str, int]) -> None:
    """The example of RFC 6455 section 1.3, and the scope's subprotocols in offered order."""
    request = upgrade(
        Sec_WebSocket_Key="dGhlIHNhbXBsZSBub25jZQ==", Sec_WebSocket_Protocol="x, chat"
    )
    head, frames = await exchange(servers["collab"], request)
    assert head[0] == "HTTP/1.1 101 Switching Protocols"
    assert "Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
    assert "Sec-WebSocket-Protocol: chat" in head
    assert frames[0]["subprotocols"] == ["x", "chat"]


def test_only_plain_upgrades_take_the_short_path() -> None:
    base = [
        (b"host", b"h"),
        (b"upgrade", b"websocket"),
        (b"connection", b"Upgrade"),
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-version", b"13"),
    ]
    assert accept_key(base) == (b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=", [])
    for name, value in [
        (b"upgrade", b"websocket"),  # doubled
        (b"sec-websocket-key", b"dGhlIHNhbXBsZSBub25jZQ=="),
        (b"sec-websocket-version", b"13"),
    ]:
        assert accept_key([*base, (name, value)]) is None, name
    assert accept_key([h for h in base if h[0] != b"connection"]) is None
    assert accept_key([(n, b"h2c" if n == b"upgrade" else v) for n, v in base]) is None


async def test_it_sets_all_of_uvicorns_state() -> None:
    """A uvicorn upgrade that adds state to its protocol must fail here, not in production."""
    assert uvicorn.__version__.startswith(CHECKED_UVICORN), (
        f"uvicorn {uvicorn.__version__} is not one collab.websocket_protocol was checked "
        "against: read its websockets-sansio protocol, then add it to CHECKED_UVICORN"
    )
    # ...and on it, the servers above (and `collab serve`, the Gunicorn worker) run Collab's
    # classes, so the comparisons compare something.
    assert protocol_classes() == (
        "collab.websocket_protocol:CollabHttpProtocol",
        "collab.websocket_protocol:CollabWebSocketProtocol",
    )
    config = Config(app, ws="websockets-sansio", ws_per_message_deflate=False)
    config.load()
    state = ServerState()
    stock = WebSocketsSansIOProtocol(config=config, server_state=state, app_state={})
    ours = CollabWebSocketProtocol(config=config, server_state=state, app_state={})
    assert set(vars(stock)) <= set(vars(ours))
    for name, value in vars(stock).items():
        if name not in ("conn", "queue", "writable", "loop"):
            assert vars(ours)[name] == value, name
