from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, status
from pydantic import BaseModel

from api import schemas
from api.deps import Context, ServiceUser
from realtime.protocol import NAME_PATTERN
from realtime.stats_feed import STATS_FEED

router = APIRouter(prefix="/feeds", tags=["feeds"])
FeedPath = Annotated[str, Path(pattern=f"^{NAME_PATTERN}$")]
# Published by the server itself: a service's update there would pass for the server's own
# (on `stats`, a node's figures on every dashboard).
BUILT_IN = {"items", STATS_FEED}


class FeedPublish(schemas.Strict):
    data: schemas.JsonObject


class Published(BaseModel):
    feed: str
    epoch: str
    offset: int


@router.post(
    "/{feed}",
    response_model=Published,
    responses={
        503: {
            "description": "The broker is unavailable: nothing was published, or (`detail."
            "delivery` is `unknown`) its reply was lost and the update may have gone out"
        }
    },
)
async def publish(
    feed: FeedPath, body: FeedPublish, _user: ServiceUser, context: Context
) -> Published:
    """Publish `data` to every `/ws/live` subscriber of `feed` (a service or admin token)."""
    from realtime.broker import BrokerUnavailable

    if feed in BUILT_IN:
        raise HTTPException(status.HTTP_403_FORBIDDEN, f"Feed '{feed}' is published by the server")
    if context.realtime is None:
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE, "Feeds are not available")
    try:
        position = await context.realtime.publish_feed(feed, body.data)
    except BrokerUnavailable as exc:
        if exc.maybe_sent:
            raise HTTPException(
                status.HTTP_503_SERVICE_UNAVAILABLE,
                {
                    "message": f"the broker's reply was lost ({exc}); the update may have "
                    "been delivered",
                    "code": "unavailable",
                    "delivery": "unknown",
                    "feed": feed,
                },
            ) from None
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "Broker unavailable; not published"
        ) from None
    return Published(feed=feed, epoch=position.epoch, offset=position.offset)
