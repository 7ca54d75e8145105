from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, status

from api import schemas, services
from api.deps import Context, CurrentUser, SessionDep
from persistence.models import Room
from persistence.repositories import RoomRepository
from realtime.protocol import NAME_PATTERN

router = APIRouter(prefix="/rooms", tags=["rooms"])
RoomPath = Annotated[str, Path(pattern=f"^{NAME_PATTERN}$")]
Limit = Annotated[int, Query(ge=1, le=200)]
Offset = Annotated[int, Query(ge=0, le=10**9)]
Cursor = Annotated[int | None, Query(ge=0, le=2**62)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=schemas.RoomOut)
async def create_room(body: schemas.RoomCreate, session: SessionDep, user: CurrentUser) -> Room:
    return await services.create_room(session, user, body)


@router.get("", response_model=schemas.Page[schemas.RoomOut])
async def list_rooms(
    session: SessionDep, user: CurrentUser, limit: Limit = 50, offset: Offset = 0
) -> schemas.Page[schemas.RoomOut]:
    rooms, total = await RoomRepository(session).visible_page(user.id, limit, offset)
    return schemas.Page(items=[schemas.RoomOut.model_validate(r) for r in rooms], total=total)


@router.get("/{room}", response_model=schemas.RoomOut)
async def read_room(room: RoomPath, session: SessionDep, user: CurrentUser) -> Room:
    found = await services.visible_room(session, user, room)
    if found is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "Room not found")
    return found


@router.get("/{room}/messages", response_model=schemas.MessageList)
async def room_messages(
    room: RoomPath,
    session: SessionDep,
    user: CurrentUser,
    context: Context,
    before: Cursor = None,
    after: Cursor = None,
    limit: Limit = 50,
    epoch: Annotated[str | None, Query(pattern=f"^{NAME_PATTERN}$")] = None,
) -> schemas.MessageList:
    """Durable history, oldest first. `after` pages forward, `before` (or neither) backward.

    Offsets count within one epoch of the room: the newest stored one, or `epoch` (an older
    epoch stays readable after the broker lost its counters and started a new one).
    """
    await services.visible_room(session, user, room)
    if context.history is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "History is not available")
    messages, has_more = await context.history.page(
        room, epoch, before=before, after=after, limit=limit
    )
    return schemas.MessageList.model_validate(
        {"messages": [m.event() for m in messages], "has_more": has_more}
    )


@router.get("/{room}/presence", response_model=schemas.PresenceOut)
async def room_presence(
    room: RoomPath, session: SessionDep, user: CurrentUser, context: Context
) -> schemas.PresenceOut:
    await services.visible_room(session, user, room)
    if context.realtime is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Presence is not available")
    members = await context.realtime.presence_members(room)
    return schemas.PresenceOut.model_validate(
        {"room": room, "members": [m.as_dict() for m in members]}
    )
