"""`/docs` and `/redoc`: served from the app's own files, and only where COLLAB_API_DOCS says."""

from __future__ import annotations

import httpx
import pytest

from collab.app import STATIC, create_app
from collab.settings import Settings


def _settings(env: str, api_docs: bool | None) -> Settings:
    return Settings(
        env=env,
        database_url="sqlite+aiosqlite:///:memory:",
        secret_key="api-docs-" + "k" * 40,
        api_docs=api_docs,
        # Production refuses to start without a list of sites.
        allowed_origins=["https://collab.example"],
    )


@pytest.mark.parametrize(
    ("env", "api_docs", "served"),
    [("test", None, True), ("production", None, False), ("production", True, True)],
)
async def test_docs_follow_the_setting(env: str, api_docs: bool | None, served: bool) -> None:
    app = create_app(_settings(env, api_docs))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert (await http.get(path)).status_code == (200 if served else 404), path


async def test_every_asset_the_docs_name_is_the_apps_own() -> None:
    app = create_app(_settings("test", None))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        for path in ("/docs", "/redoc"):
            page = (await http.get(path)).text
            assert "https://" not in page and "http://" not in page, path
            assert "img-src 'self'" in (await http.get(path)).headers["content-security-policy"]
        for asset in (
            "/static/vendor/swagger-ui/swagger-ui-bundle.js",
            "/static/vendor/swagger-ui/swagger-ui.css",
            "/static/vendor/redoc/redoc.standalone.js",
            "/static/favicon.svg",
            "/favicon.ico",
        ):
            assert (await http.get(asset)).status_code == 200, asset
    # The vendored copies keep their licenses beside them.
    for folder in ("swagger-ui", "redoc"):
        assert (STATIC / "vendor" / folder / "LICENSE").is_file()
