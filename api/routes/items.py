from __future__ import annotations

import logging
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status

from api import schemas, services
from api.deps import Context, CurrentUser, SessionDep
from persistence.models import Item
from persistence.repositories import ItemRepository
from realtime.broker import BrokerUnavailable

log = logging.getLogger("collab.api")
router = APIRouter(prefix="/items", tags=["items"])
ItemId = Annotated[int, Path(ge=1, le=2**31 - 1)]
Limit = Annotated[int, Query(ge=1, le=200)]
Offset = Annotated[int, Query(ge=0, le=10**9)]


# The built-in feed of item changes (PROTOCOL: `{"op", "item"}` updates); its snapshot is the
# newest items (`collab.realtime_wiring`).
ITEMS_FEED = "items"


async def _announce(context: Context, op: str, item: Item) -> None:
    """Tell `/ws/live` subscribers of feed `items`, when the realtime layer is wired in."""
    if context.realtime is None:
        return
    payload = schemas.ItemOut.model_validate(item).model_dump(mode="json")
    try:
        await context.realtime.publish_feed(ITEMS_FEED, {"op": op, "item": payload})
    except BrokerUnavailable:
        # The change is committed; dashboards resynchronise from the snapshot on reconnect.
        log.warning("items feed: could not announce %s of item %s", op, item.id)


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.ItemOut)
async def create_item(
    body: schemas.ItemCreate, session: SessionDep, user: CurrentUser, context: Context
) -> Item:
    item = await services.create_item(session, user, body)
    await _announce(context, "created", item)
    return item


@router.get("", response_model=schemas.Page[schemas.ItemOut])
async def list_items(
    session: SessionDep,
    _user: CurrentUser,
    limit: Limit = 50,
    offset: Offset = 0,
    owner_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> schemas.Page[schemas.ItemOut]:
    items, total = await ItemRepository(session).page(limit, offset, owner_id)
    return schemas.Page(items=[schemas.ItemOut.model_validate(i) for i in items], total=total)


@router.get("/{item_id}", response_model=schemas.ItemOut)
async def read_item(item_id: ItemId, session: SessionDep, _user: CurrentUser) -> Item:
    return await services.get_item(session, item_id)


@router.patch(
    "/{item_id}",
    response_model=schemas.ItemOut,
    responses={409: {"description": "The `version` is stale"}},
)
async def update_item(
    item_id: ItemId,
    body: schemas.ItemUpdate,
    session: SessionDep,
    user: CurrentUser,
    context: Context,
) -> Item:
    item = await services.update_item(session, user, item_id, body)
    await _announce(context, "updated", item)
    return item


@router.delete(
    "/{item_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={409: {"description": "The `version` is stale"}},
)
async def delete_item(
    item_id: ItemId,
    session: SessionDep,
    user: CurrentUser,
    context: Context,
    version: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> Response:
    item = await services.delete_item(session, user, item_id, version)
    await _announce(context, "deleted", item)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
