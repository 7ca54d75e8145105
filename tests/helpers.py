"""Small steps many tests take: register, log in, get a guest token."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx
import pytest


async def register(
    http: httpx.AsyncClient, username: str, password: str = "correct horse"
) -> dict[str, object]:
    response = await http.post("/auth/register", json={"username": username, "password": password})
    assert response.status_code == 201, response.text
    user: dict[str, object] = response.json()
    return user


async def login(
    http: httpx.AsyncClient, username: str, password: str = "correct horse"
) -> dict[str, str]:
    response = await http.post("/auth/token", data={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def user_with_token(
    http: httpx.AsyncClient, username: str
) -> tuple[dict[str, object], dict[str, str]]:
    user = await register(http, username)
    return user, await login(http, username)


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll `check` until it holds; the seconds it took. Fails the test at the deadline."""
    start = time.monotonic()
    while not await check():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout}s")
        await asyncio.sleep(interval)
    return time.monotonic() - start
