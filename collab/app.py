"""`create_app(settings)`: the one place that wires every package together.

Nothing is built at import time. The lifespan builds the engine, the realtime backends and
the hub, so a test can build as many apps as it likes, each with its own settings.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio.to_thread
from fastapi import FastAPI, Request, Response
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import Receive, Scope, Send

from api import ROUTERS, ApiConfig, ApiContext
from api.accounts import AccountCache
from api.ratelimit import LoginFailureLimiter
from api.security import HashingPool
from api.services import GuestBatcher
from api.tickets import ticket_store
from collab.gc_pauses import ConnectionCounts, GcFreezer
from collab.metrics import NodeCollector
from collab.realtime_wiring import build_node, close_with_1001_on_exit, token_authenticator
from collab.settings import Settings
from persistence import migrate
from persistence.database import create_engine, create_session_factory, is_busy
from persistence.history import DatabaseHistory
from realtime.endpoints import WebSocketEndpoint
from realtime.node import Node
from realtime.protocol import Endpoint

log = logging.getLogger("collab")
STATIC = Path(__file__).parent / "static"
# The wire protocol's AsyncAPI document (docs/PROTOCOL.md in prose), shipped in the package.
ASYNCAPI = Path(__file__).parent / "asyncapi.json"
FAVICON = "/static/favicon.svg"
# The API docs' pages may load nothing from elsewhere: ReDoc's menu has a logo from its
# vendor's CDN built in, which this keeps the browser from even asking for. Inline script and
# style are the pages' own (FastAPI's start-up script; ReDoc's generated styles).
DOCS_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; worker-src 'self' blob:; connect-src 'self'; font-src 'self' data:"
)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.should_auto_migrate:
            # Alembic runs its own event loop, so it gets a thread of its own.
            await anyio.to_thread.run_sync(migrate.upgrade, settings.database_url)
        engine = create_engine(settings.database_url, busy_timeout=settings.database_busy_timeout)
        sessions = create_session_factory(engine)

        async def database_ready() -> bool:
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            return True

        node = build_node(settings, sessions)
        accounts = AccountCache(settings.account_cache_seconds)
        # Deleted, or its password or role changed, on any node: stop trusting the memory.
        node.user_listeners.append(lambda user_id: _forget(accounts, user_id))
        await node.start()
        app.state.node = node

        async def broker_ready() -> bool:
            return node.broker.healthy

        async def persistence_ready() -> bool:
            return node.sink.healthy

        app.state.api = ApiContext(
            config=ApiConfig(
                secret_key=settings.secret,
                access_token_minutes=settings.access_token_minutes,
                guest_access=settings.guest_access,
                auth_rate_limit=settings.auth_rate_limit,
                auth_rate_burst=settings.auth_rate_burst,
                login_failure_limit=settings.login_failure_limit,
                ws_ticket_seconds=settings.ws_ticket_seconds,
            ),
            sessions=sessions,
            readiness={
                "database": database_ready,
                "broker": broker_ready,
                "persistence": persistence_ready,
            },
            history=DatabaseHistory(sessions),
            realtime=node,
            # Shared by every node when the broker is Redis, so that neither a ticket's one
            # use nor an account's sign-in limit depends on which node a request reaches.
            login_limiter=LoginFailureLimiter(settings.login_failure_limit, settings.broker_url),
            tickets=ticket_store(settings.broker_url, settings.ws_ticket_seconds),
            hashing=HashingPool(settings.password_hash_concurrency, settings.password_hash_queue),
            guests=GuestBatcher(sessions),
            accounts=accounts,
        )
        freezer = None
        if settings.gc_freeze:
            hub = node.hub
            freezer = GcFreezer(
                lambda: ConnectionCounts(hub.opened, hub.closed, len(hub.connections))
            )
            freezer.start()
        app.state.gc_freezer = freezer
        log.info("collab node %s ready (%s)", settings.node_id, settings.env)
        try:
            with close_with_1001_on_exit(node, min(settings.shutdown_timeout, 5.0)):
                yield
        finally:
            if freezer is not None:
                await freezer.close()
            await node.close()
            await app.state.api.tickets.close()
            await app.state.api.login_limiter.close()
            await engine.dispose()

    app = CollabApp(
        title="Collab",
        version="0.1.0",
        description="Real-time collaboration server: WebSocket rooms and feeds, and this REST API.",
        lifespan=lifespan,
        # The API's pages say nothing secret, but production need not advertise them.
        # FastAPI's own /docs and /redoc load their scripts from a CDN, blank on a machine
        # without internet access: ours (below) load the copies under static/vendor.
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if settings.serves_api_docs else None,
    )
    app.state.settings = settings
    registry = CollectorRegistry()
    collector = NodeCollector(lambda: getattr(app.state, "node", None))
    registry.register(collector)
    app.state.metrics = registry
    for router in ROUTERS:
        app.include_router(router)
    app.add_exception_handler(SQLAlchemyError, database_busy_is_503)

    def node() -> Node:
        current: Node = app.state.node
        return current

    def api_context() -> ApiContext:
        context: ApiContext = app.state.api
        return context

    authenticate = token_authenticator(settings.secret, api_context)
    kinds: tuple[Endpoint, ...] = ("chat", "live")
    app.websocket_endpoints = {
        f"/ws/{kind}": WebSocketEndpoint(kind, node, authenticate, settings.allowed_origins)
        for kind in kinds
    }

    @app.get("/metrics", include_in_schema=False)
    async def metrics(_request: Request) -> Response:
        return Response(await collector.scrape(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/asyncapi.json", include_in_schema=False)
    async def asyncapi() -> FileResponse:
        # Always served, unlike /openapi.json: it describes the public wire protocol that
        # every client already speaks, and says nothing about this deployment.
        return FileResponse(ASYNCAPI, media_type="application/json")

    if settings.serves_api_docs:
        _add_api_docs(app)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> FileResponse:
        # Browsers ask for it on pages that name none (the JSON endpoints, for one).
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    for path, page in (("/", "index.html"), ("/chat", "chat.html"), ("/live", "live.html")):
        app.add_api_route(path, _page(page), include_in_schema=False, methods=["GET"])
    return app


def _forget(accounts: AccountCache, user_id: str) -> None:
    if user_id.isdigit():
        accounts.forget(int(user_id))


# Long enough for a crowd's queue to move on, short enough that a retry soon gets in.
BUSY_RETRY_AFTER_SECONDS = 1


async def database_busy_is_503(_request: Request, error: Exception) -> Response:
    """A database that is contended or overloaded (its write lock, its pool) is not a fault:
    503 with Retry-After, never 500. Any other database error stays a 500."""
    if not is_busy(error):
        raise error
    log.warning("database busy, answered 503: %s", error)
    return JSONResponse(
        {"detail": "The server is busy; try again shortly"},
        status_code=503,
        headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)},
    )


def _add_api_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc`, every asset from the app's own static/vendor."""
    openapi_url = app.openapi_url or "/openapi.json"
    oauth2_redirect = app.swagger_ui_oauth2_redirect_url

    @app.get("/docs", include_in_schema=False)
    async def swagger_ui() -> HTMLResponse:
        page = get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - Swagger UI",
            swagger_js_url="/static/vendor/swagger-ui/swagger-ui-bundle.js",
            swagger_css_url="/static/vendor/swagger-ui/swagger-ui.css",
            swagger_favicon_url=FAVICON,
            oauth2_redirect_url=oauth2_redirect,
        )
        page.headers["Content-Security-Policy"] = DOCS_POLICY
        return page

    if oauth2_redirect:

        @app.get(oauth2_redirect, include_in_schema=False)
        async def swagger_ui_redirect() -> HTMLResponse:
            return get_swagger_ui_oauth2_redirect_html()

    @app.get("/redoc", include_in_schema=False)
    async def redoc() -> HTMLResponse:
        page = get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url="/static/vendor/redoc/redoc.standalone.js",
            redoc_favicon_url=FAVICON,
            # Google Fonts is a CDN too; ReDoc falls back to the system's fonts.
            with_google_fonts=False,
        )
        page.headers["Content-Security-Policy"] = DOCS_POLICY
        return page


def _page(name: str) -> Callable[[], Awaitable[FileResponse]]:
    async def page() -> FileResponse:
        return FileResponse(STATIC / name, media_type="text/html")

    return page


class CollabApp(FastAPI):
    """FastAPI, with `/ws/chat` and `/ws/live` handed straight to their endpoints.

    A socket lives for hours, and every layer it passes through keeps a coroutine frame for
    that long: FastAPI's and Starlette's `__call__`, the server-error, telemetry and body-limit
    middleware, the exception middleware and the router. Checked before all of them, the two
    WebSocket paths skip every one (measured at 10,000 connections: 1.6 KB less per idle
    connection than a middleware inside FastAPI's stack, which itself saved about 5 KB over
    the router, and faster connects); everything else goes through FastAPI as usual.
    """

    websocket_endpoints: dict[str, WebSocketEndpoint]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            endpoint = self.websocket_endpoints.get(scope["path"])
            if endpoint is not None:
                await endpoint(scope, receive, send)  # type: ignore[arg-type]
                return
        await super().__call__(scope, receive, send)


def create_app_from_env() -> FastAPI:
    """For `uvicorn --factory` and Gunicorn: settings from the environment only."""
    return create_app(Settings(node_id=os.environ.get("COLLAB_NODE_ID") or _node_name()))


def _node_name() -> str:
    """Host, port and process: each worker process is a node of its own."""
    import socket

    port = os.environ.get("COLLAB_PORT", "")
    host = f"{socket.gethostname()}:{port}" if port else socket.gethostname()
    return f"{host}-{os.getpid()}"
