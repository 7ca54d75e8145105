from __future__ import annotations

from typing import Annotated

import orjson
from fastapi import APIRouter, HTTPException, Path, Query, status

from api import schemas, services
from api.deps import Context, CurrentUser, ServiceUser, SessionDep
from persistence.models import Room
from persistence.repositories import RoomRepository
from realtime import protocol as p
from realtime.broker import BrokerUnavailable
from realtime.node import PublishUnconfirmed
from realtime.protocol import NAME_PATTERN
from realtime.types import UserInfo

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


@router.post(
    "/{room}/messages",
    status_code=status.HTTP_201_CREATED,
    response_model=schemas.MessagePublished,
    responses={
        403: {"description": "Not a service account, or a private room it is not a member of"},
        413: {"description": "The body is over the server's body limit"},
        500: {"description": "Delivered, but the database refused it (`outcome: unknown`)"},
        503: {
            "description": "The broker is down (nothing published); its reply was lost "
            "(`detail.delivery` is `unknown`: maybe published); or delivered but storage did "
            "not confirm (`detail.outcome` is `unknown`). Retrying with the same "
            "client_msg_id is safe in every case."
        },
    },
)
async def publish_message(
    room: RoomPath, body: schemas.MessagePublish, user: ServiceUser, context: Context
) -> schemas.MessagePublished:
    """Publish to a room as a service: delivered, stored and numbered like a member's publish.

    Answers once storage confirmed the message, as the `ack` of a WebSocket publish does.
    """
    node = context.realtime
    if node is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Rooms are not available")
    # The WebSocket command's own parser: one set of rules for body size, nesting and
    # client_msg_id, whichever way a message arrives.
    frame: dict[str, object] = {"type": "publish", "room": room, "body": body.body}
    if body.client_msg_id is not None:
        frame["client_msg_id"] = body.client_msg_id
    try:
        command = p.parse_command(
            orjson.dumps(frame), "chat", max_body_bytes=node.limits.max_body_bytes
        )
        assert isinstance(command, p.Publish)
        result = await node.publish_as(UserInfo(id=str(user.id), name=user.display_name), command)
    except p.ProtocolError as exc:
        code = {
            p.ErrorCode.TOO_LARGE: status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
            p.ErrorCode.FORBIDDEN: status.HTTP_403_FORBIDDEN,
        }.get(exc.code, status.HTTP_422_UNPROCESSABLE_ENTITY)
        raise HTTPException(code, exc.message) from None
    except BrokerUnavailable as exc:
        if exc.maybe_sent:
            # The broker's reply was lost: the message may have gone out. Saying "not
            # published" would invite a retry under a new client_msg_id, and a duplicate.
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                {
                    "message": f"the broker's reply was lost ({exc}); the message may have "
                    "been delivered: retry with the same client_msg_id",
                    "code": "unavailable",
                    "delivery": "unknown",
                    "room": room,
                },
            ) from None
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "Broker unavailable; not published"
        ) from None
    except PublishUnconfirmed as exc:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE
            if exc.code == p.ErrorCode.UNAVAILABLE
            else status.HTTP_500_INTERNAL_SERVER_ERROR,
            {
                "message": exc.message,
                "code": exc.code.value,
                "outcome": "unknown",
                "room": exc.room,
                "offset": exc.offset,
                "msg_id": exc.msg_id,
            },
        ) from None
    return schemas.MessagePublished(
        room=room, epoch=result.epoch, offset=result.offset, msg_id=result.msg_id
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
