from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from api.deps import Context

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and its event loop answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "A backend does not answer"}})
async def readyz(context: Context) -> JSONResponse:
    """Every backend answers now; a load balancer sends no traffic here until it does."""

    async def run(check_name: str) -> tuple[str, bool]:
        try:
            return check_name, await asyncio.wait_for(context.readiness[check_name](), 2.0)
        except Exception:  # any failure of a check means "not ready", never a 500
            return check_name, False

    results = dict(await asyncio.gather(*(run(name) for name in context.readiness)))
    ready = all(results.values())
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": results},
        status_code=200 if ready else 503,
    )
