"""The browser pages in a real headless Chromium: what a chat user and a dashboard user see."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.processes import ServerProcess, server_env
from tests.services import IN_CI

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("pages")
    node = ServerProcess(server_env(folder), folder / "server.log").start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    if CHROMIUM is None:
        if IN_CI:
            pytest.fail("Chromium is missing; .ci/run installs it")
        pytest.skip("no Chromium on this machine")
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--no-first-run",
            ],
        )
        try:
            yield instance
        finally:
            await instance.close()


async def test_two_people_chat_in_a_room(server: ServerProcess, browser: Any) -> None:
    room = f"page-{uuid.uuid4().hex[:8]}"
    ann = await browser.new_page()
    bob = await browser.new_page()
    await ann.goto(f"{server.url}/chat?name=ann&room={room}")
    await bob.goto(f"{server.url}/chat?name=bob&room={room}")
    for page in (ann, bob):
        await page.wait_for_selector("#text:not([disabled])", timeout=10_000)
    # Each sees the other in the member list.
    await ann.wait_for_function(
        "document.querySelector('#members').textContent.includes('bob')", timeout=10_000
    )
    await ann.fill("#text", "hello from <b>ann</b>")
    await ann.press("#text", "Enter")
    await bob.wait_for_function(
        "document.querySelector('#messages').textContent.includes('hello from <b>ann</b>')",
        timeout=10_000,
    )
    # Text is shown as text, never as markup.
    assert await bob.locator("#messages b").count() == 0
    # A newcomer sees the history.
    cid = await browser.new_page()
    await cid.goto(f"{server.url}/chat?name=cid&room={room}")
    await cid.wait_for_function(
        "document.querySelector('#messages').textContent.includes('hello from')", timeout=10_000
    )
    if os.environ.get("COLLAB_SCREENSHOTS"):
        await bob.screenshot(path=str(Path(os.environ["COLLAB_SCREENSHOTS"]) / "chat.png"))


async def test_dashboard_shows_items_as_they_change(server: ServerProcess, browser: Any) -> None:
    page = await browser.new_page()
    await page.goto(f"{server.url}/live")
    await page.wait_for_function(
        "document.querySelector('#status').textContent === 'live'", timeout=10_000
    )
    token = httpx.post(f"{server.url}/auth/guest", json={"name": "editor"}).json()["access_token"]
    title = f"item-{uuid.uuid4().hex[:6]}"
    httpx.post(
        f"{server.url}/items", json={"title": title}, headers={"Authorization": f"Bearer {token}"}
    )
    await page.wait_for_function(
        f"document.querySelector('#items').textContent.includes('{title}')", timeout=10_000
    )
    if os.environ.get("COLLAB_SCREENSHOTS"):
        await page.screenshot(path=str(Path(os.environ["COLLAB_SCREENSHOTS"]) / "live.png"))


@pytest.mark.parametrize(
    ("path", "rendered"),
    [
        # Swagger UI's list of operations, one block per operation.
        ("/docs", ".opblock"),
        # ReDoc's menu of operations.
        ("/redoc", "[role=menuitem], .menu-content li"),
    ],
)
async def test_api_docs_work_without_the_internet(
    server: ServerProcess, browser: Any, path: str, rendered: str
) -> None:
    context = await browser.new_context()
    elsewhere: list[str] = []

    async def only_the_server(route: Any) -> None:
        url: str = route.request.url
        if url.startswith(server.url) or url.startswith("data:"):
            await route.continue_()
        else:
            elsewhere.append(url)
            await route.abort()

    await context.route("**/*", only_the_server)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"{server.url}{path}")
    await page.wait_for_selector(rendered, timeout=20_000)
    assert await page.locator(rendered).count() > 3
    assert errors == []
    # Every asset, the favicon included, came from the server: nothing even tried elsewhere.
    assert elsewhere == []
    await context.close()
