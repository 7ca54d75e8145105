"""The browser pages in a real headless Chromium: what a chat user and a dashboard user see."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from collab.publisher import Publisher
from collab.settings import Settings
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


async def screenshot(page: Any, tmp_path: Path, name: str) -> None:
    """A test artifact under the test's tmp_path; also into COLLAB_SCREENSHOTS when set (to
    refresh docs/screenshots/)."""
    await page.screenshot(path=str(tmp_path / name), full_page=True)
    if os.environ.get("COLLAB_SCREENSHOTS"):
        await page.screenshot(path=str(Path(os.environ["COLLAB_SCREENSHOTS"]) / name))


async def test_two_people_chat_in_a_room(
    server: ServerProcess, browser: Any, tmp_path: Path
) -> None:
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
    await screenshot(bob, tmp_path, "chat.png")
    # A room the user may not join is said so, with the server's code; nothing else happens.
    private = f"private-{uuid.uuid4().hex[:8]}"
    owner = {"Authorization": f"Bearer {service_token(server, f'owner-{private}')}"}
    created = httpx.post(
        f"{server.url}/rooms", json={"name": private, "private": True}, headers=owner
    )
    assert created.status_code == 201, created.text
    eve = await browser.new_page()
    await eve.goto(f"{server.url}/chat?name=eve&room={private}")
    await eve.wait_for_function(
        f"document.querySelector('#status').textContent === 'cannot join {private}: forbidden'",
        timeout=10_000,
    )
    assert await eve.locator("#text").is_disabled()


async def test_dashboard_shows_items_as_they_change(
    server: ServerProcess, browser: Any, tmp_path: Path
) -> None:
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
    await screenshot(page, tmp_path, "live-items.png")


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


def service_token(server: ServerProcess, name: str) -> str:
    """A service account made the way an operator makes one: `collab create-user`."""
    password = "a long service password"
    created = subprocess.run(
        [sys.executable, "-m", "collab", "create-user", name, "--role", "service"],
        input=f"{password}\n",
        env=server.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert created.returncode == 0, created.stderr
    response = httpx.post(f"{server.url}/auth/token", data={"username": name, "password": password})
    assert response.status_code == 200, response.text
    token: str = response.json()["access_token"]
    return token


async def test_dashboard_charts_a_feed_across_a_server_restart(
    redis_url: str, browser: Any, tmp_path: Path
) -> None:
    """What a service publishes is charted point for point, in order: before a restart, while
    the page is reconnecting (recovered with `since` from Redis), and after."""
    env = server_env(
        tmp_path, {"COLLAB_BROKER_URL": redis_url, "COLLAB_PUBLIC_FEEDS": "items,stats,sensors"}
    )
    server = ServerProcess(env, tmp_path / "server.log").start()
    try:
        token = service_token(server, "sensor-svc")
        published: list[float] = []

        def publish(count: int) -> None:
            for _ in range(count):
                value = round(20 + len(published) * 0.5 + (len(published) % 3), 2)
                response = httpx.post(
                    f"{server.url}/feeds/sensors",
                    json={
                        "data": {
                            "temperature": value,
                            "load": {"cpu": len(published)},
                            "site": "lab",
                        }
                    },
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert response.status_code == 200, response.text
                published.append(value)

        page = await browser.new_page(viewport={"width": 1200, "height": 900})
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        await page.goto(f"{server.url}/live?feeds=stats,sensors")
        await page.wait_for_function(
            "document.querySelector('#status').textContent === 'live'", timeout=10_000
        )
        # "live" is the connection; the feed's own subscription is confirmed a reply later, and
        # only then does the page get what is published (the panel's state says which).
        await page.wait_for_function(
            "document.querySelector('section[data-feed=\"sensors\"]')?.dataset.state"
            " === 'subscribed'",
            timeout=10_000,
        )
        assert await page.locator("section[data-feed=sensors] .meta").text_content() == (
            "waiting for updates"
        )
        chart = 'section[data-feed="sensors"] figure[data-field="{}"] svg'

        async def charted(field: str, count: int) -> list[float]:
            selector = chart.format(field)
            await page.wait_for_function(
                f"document.querySelector('{selector}')?.dataset.count === '{count}'",
                timeout=15_000,
            )
            values: list[float] = await page.eval_on_selector(
                selector, "svg => JSON.parse(svg.dataset.values)"
            )
            return values

        publish(5)
        assert await charted("temperature", 5) == published

        # The page may not reconnect until it is let (its ticket requests fail meanwhile), so
        # the next five are published while it is away and can only come back through `since`.
        await page.route("**/auth/ws-ticket", lambda route: route.abort())
        server.stop()
        await page.wait_for_function(
            "document.querySelector('#status').dataset.state !== 'connected'", timeout=10_000
        )
        assert await page.locator("section[data-feed=sensors]").get_attribute("data-state") == (
            "subscribing"
        )
        server.start()
        publish(5)
        assert await charted("temperature", 5) == published[:5]
        await page.unroute("**/auth/ws-ticket")
        await page.wait_for_function(
            "document.querySelector('#status').textContent === 'live'", timeout=20_000
        )
        assert await charted("temperature", 10) == published
        publish(5)
        assert await charted("temperature", 15) == published
        # Nested numbers are charted too, under a dotted name; strings are not.
        assert await charted("load.cpu", 15) == list(range(15))
        assert await page.locator("section[data-feed=sensors] figure[data-field=site]").count() == 0
        # No gap was reported: the reconnect recovered everything.
        assert await page.locator("section[data-feed=sensors] .note").is_hidden()
        # The built-in stats feed is charted beside it, summed over the nodes: here the one
        # restarted node, which counts this page's connection.
        await page.wait_for_function(
            'JSON.parse(document.querySelector(\'section[data-feed="stats"]'
            " figure[data-field=\"connections\"] svg')?.dataset.values ?? '[0]').at(-1) === 1",
            timeout=10_000,
        )
        # A second node's update, through the broker the nodes share (REST refuses `stats`
        # to services: nobody may pose as a node there): the charts add it in.
        other = {
            "node": "other-node",
            "connections": 10,
            "rooms": 0,
            "messages_in_per_second": 0,
            "deliveries_per_second": 0,
            "outgoing_queue_bytes": 0,
            "storage_lag_seconds": 0,
        }
        refused = httpx.post(
            f"{server.url}/feeds/stats",
            json={"data": other},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert refused.status_code == 403, refused.text
        settings = Settings(
            env="test",
            broker_url=redis_url,
            database_url=env["COLLAB_DATABASE_URL"],
            secret_key=env["COLLAB_SECRET_KEY"],
        )
        async with Publisher(settings, name="other-node") as node:
            await node.publish_feed("stats", other)
        await page.wait_for_function(
            'JSON.parse(document.querySelector(\'section[data-feed="stats"]'
            ' figure[data-field="connections"] svg\').dataset.values).includes(11)',
            timeout=10_000,
        )
        # A feed the guest may not read is said to be refused, and the others go on.
        await page.fill("#feed-name", "private")
        await page.press("#feed-name", "Enter")
        private = page.locator("section[data-feed=private]")
        await page.wait_for_function(
            "document.querySelector('section[data-feed=\"private\"]')?.dataset.state === 'refused'",
            timeout=10_000,
        )
        assert await private.locator(".note").text_content() == "Cannot chart private: forbidden"
        publish(1)
        assert await charted("temperature", 16) == published
        assert errors == []
        await screenshot(page, tmp_path, "live.png")
    finally:
        server.stop()


async def test_chat_signs_in_scrolls_back_and_fills_in_after_a_reconnect(
    server: ServerProcess, browser: Any, tmp_path: Path
) -> None:
    room = f"history-{uuid.uuid4().hex[:8]}"
    service = {"Authorization": f"Bearer {service_token(server, f'svc-{room}')}"}

    def post(text: str) -> None:
        response = httpx.post(
            f"{server.url}/rooms/{room}/messages", json={"body": {"text": text}}, headers=service
        )
        assert response.status_code == 201, response.text

    for n in range(120):
        post(f"old {n}")
    username = f"carol{uuid.uuid4().hex[:6]}"
    registered = httpx.post(
        f"{server.url}/auth/register",
        json={"username": username, "password": "carol's long password"},
    )
    assert registered.status_code == 201, registered.text

    page = await browser.new_page(viewport={"width": 1000, "height": 700})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    await page.goto(f"{server.url}/chat")
    # A registered user, not a guest.
    await page.fill("#room", room)
    await page.fill("#username", username)
    await page.fill("#password", "carol's long password")
    await page.click("#signin")
    await page.wait_for_selector("#text:not([disabled])", timeout=10_000)
    await page.wait_for_function(
        f"document.querySelector('#status').textContent.endsWith('as {username}')",
        timeout=10_000,
    )
    texts = "[...document.querySelectorAll('#messages li')].map(li => li.children[1].textContent)"
    # The latest page first, then older pages by scrolling to the top, until the beginning.
    assert await page.evaluate(texts) == [f"old {n}" for n in range(70, 120)]
    while await page.get_attribute("#older", "data-has-more") != "false":
        count = await page.locator("#messages li").count()
        await page.evaluate("document.querySelector('#scroller').scrollTop = 0")
        await page.wait_for_function(
            f"document.querySelectorAll('#messages li').length > {count}"
            " || document.querySelector('#older').dataset.hasMore === 'false'",
            timeout=10_000,
        )
    assert await page.evaluate(texts) == [f"old {n}" for n in range(120)]
    assert await page.locator("#older-note").text_content() == "The beginning of the room."

    # The connection drops and cannot come back yet (its ticket requests fail): the page says
    # so, and what is sent meanwhile is filled in once when it is back.
    await page.route("**/auth/ws-ticket", lambda route: route.abort())
    await page.evaluate("window.chat.socket.ws.close()")
    await page.wait_for_function(
        "document.querySelector('#status').dataset.state === 'reconnecting'", timeout=10_000
    )
    assert await page.locator("#banner").is_visible()
    for n in range(3):
        post(f"meanwhile {n}")
    await screenshot(page, tmp_path, "chat-reconnecting.png")
    assert await page.locator("#messages li").count() == 120
    await page.unroute("**/auth/ws-ticket")
    await page.wait_for_function(
        "document.querySelector('#status').dataset.state === 'connected'", timeout=20_000
    )
    await page.wait_for_function(
        "document.querySelectorAll('#messages li').length === 123", timeout=10_000
    )
    assert (await page.evaluate(texts))[-4:] == ["old 119", *(f"meanwhile {n}" for n in range(3))]
    banner = await page.locator("#banner").text_content()
    assert banner is not None and "3 messages sent meanwhile" in banner
    # And the page still sends: its own message shows once.
    await page.fill("#text", "back again")
    await page.press("#text", "Enter")
    await page.wait_for_function(
        "document.querySelectorAll('#messages li').length === 124", timeout=10_000
    )
    ids = await page.evaluate(
        "[...document.querySelectorAll('#messages li')].map(li => li.dataset.msgId)"
    )
    assert len(set(ids)) == len(ids) == 124
    assert errors == []
    await page.evaluate("document.querySelector('#scroller').scrollTop = 1e9")
    await screenshot(page, tmp_path, "chat-history.png")
