"""Presence shared by every node, in Redis.

Keys per room (one hash tag, so each script touches one Redis Cluster slot):

- `collab:presence:{<room>}:conns`: hash conn_id -> `["<user id>", "<user name>", "<node>"]`
- `collab:presence:{<room>}:seen`: zset conn_id -> last seen, in milliseconds of Redis `TIME`
- `collab:presence:{<room>}:users`: hash user id -> that user's connections in the room
- `collab:presence:{<room>}:names`: hash user id -> the name their latest connection gave, so
  that `members` (part of every join's reply) reads one field per user, not per connection

and `collab:presence:rooms`, the set of rooms that may hold entries, which is how `expire`
finds them (on a Redis Cluster 16 sets, `collab:presence:rooms:{g<n>}`, a room in set
`crc32(room) % 16`). No key has a TTL: entries leave through `remove` or `expire`.

On a Redis Cluster (`redis+cluster://`) the same keys and scripts: each script touches one
room's slot. Calls that span rooms run one command per room, concurrently, instead of in a
pipeline (a cluster pipeline cannot carry scripts).

Times come from Redis `TIME` inside the scripts, never from the nodes: the node that refreshes
an entry and the node that expires it compare readings of one clock, so skew between nodes
cannot expire live connections or keep dead ones.

Each transition is decided inside one script on the room's keys (the count going 0 -> 1 or
1 -> 0), so exactly one caller sees it, whichever node and however many call at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import zlib
from collections.abc import Iterable, Iterator
from typing import Any, cast

import orjson
import redis.asyncio as aioredis

from realtime.presence import Member, Presence, PresenceUnavailable
from realtime.redis_client import UNAVAILABLE, AnyRedis, any_redis_client, is_cluster, lua_script
from realtime.types import UserInfo

__all__ = ["RedisPresence"]

log = logging.getLogger(__name__)

_PREFIX = "collab:presence:"
_ROOMS_KEY = _PREFIX + "rooms"
# On a cluster the set of rooms is split, each part in its own slot, so that every join's SADD
# does not land on one shard.
_ROOM_GROUPS = 16
_SOCKET_TIMEOUT = 2.0
_EXPIRE_BATCH = 1000  # stale connections removed per script call: no long-running script
_PIPELINE_ROOMS = 500


# Returns 1 when this is the user's first connection in the room.
_ADD_LUA = lua_script("presence_add.lua")

# Returns the entry when it was the user's last connection in the room, else nil.
_REMOVE_LUA = lua_script("presence_remove.lua")

# Only entries that exist: a refresh racing a remove or an expiry must not bring a half entry
# back. The ones not found are returned; their owner decides whether to add them again.
_REFRESH_LUA = lua_script("presence_refresh.lua")

# Returns {stale connections removed, connections left, entries of users who left}.
_EXPIRE_LUA = lua_script("presence_expire.lua")


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    try:
        yield
    except UNAVAILABLE as exc:
        raise PresenceUnavailable(str(exc) or type(exc).__name__) from exc


def _keys(room: str) -> list[str]:
    base = f"{_PREFIX}{{{room}}}:"
    return [base + "conns", base + "seen", base + "users", base + "names"]


def _user(entry: bytes) -> UserInfo:
    user_id, name, _node = orjson.loads(entry)
    return UserInfo(id=str(user_id), name=str(name))


class RedisPresence(Presence):
    def __init__(self, url: str, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._client: AnyRedis = any_redis_client(url, timeout=_SOCKET_TIMEOUT)
        self._cluster = is_cluster(url)
        self._add = self._client.register_script(_ADD_LUA)
        self._remove = self._client.register_script(_REMOVE_LUA)
        self._refresh = self._client.register_script(_REFRESH_LUA)
        self._expire = self._client.register_script(_EXPIRE_LUA)

    async def start(self) -> None:
        """Checks the connection once, without failing: Redis being down at startup is an
        outage like any other (calls raise PresenceUnavailable until it is back)."""
        try:
            await self._client.ping()
        except UNAVAILABLE as exc:
            log.warning("Redis presence is not reachable yet: %s", exc)

    async def close(self) -> None:
        await self._client.aclose()

    async def add(self, room: str, conn_id: str, user: UserInfo, node_id: str) -> bool:
        entry = orjson.dumps([user.id, user.name, node_id])
        with _unavailable():
            if self._cluster:
                # The room joins the set after the entry exists; `expire` relies on this order.
                first = await self._add(keys=_keys(room), args=[conn_id, entry, user.id, user.name])
                await self._client.sadd(self._rooms_key(room), room)
                return bool(first)
            async with cast(aioredis.Redis, self._client).pipeline(transaction=False) as pipe:
                # The room joins the set after the entry exists; `expire` relies on this order.
                await self._add(
                    keys=_keys(room), args=[conn_id, entry, user.id, user.name], client=pipe
                )
                pipe.sadd(_ROOMS_KEY, room)
                first, _ = await pipe.execute()
        return bool(first)

    async def remove(self, room: str, conn_id: str) -> UserInfo | None:
        with _unavailable():
            entry = await self._remove(keys=_keys(room), args=[conn_id])
        return _user(entry) if entry else None

    async def members(self, room: str) -> list[Member]:
        conns_key, _, users_key, names_key = _keys(room)
        with _unavailable():
            if self._cluster:
                # Names first: a user counted but not yet named falls back to the entries.
                raw_names = await self._client.hgetall(names_key)
                raw_counts = await self._client.hgetall(users_key)
            else:
                async with cast(aioredis.Redis, self._client).pipeline(transaction=True) as pipe:
                    pipe.hgetall(users_key)
                    pipe.hgetall(names_key)
                    raw_counts, raw_names = await pipe.execute()
            named = cast(dict[bytes, bytes], raw_names)
            names = {k.decode(): v.decode() for k, v in named.items()}
            counts = {k.decode(): int(v) for k, v in cast(dict[bytes, bytes], raw_counts).items()}
            if any(user_id not in names for user_id in counts):
                # Entries added before names were kept (a node of an older version): read
                # the names from the connections, once.
                entries = cast(dict[bytes, bytes], await self._client.hgetall(conns_key))
                for entry in entries.values():
                    user = _user(entry)
                    names.setdefault(user.id, user.name)
        return [
            Member(user=UserInfo(id=user_id, name=names.get(user_id, "")), connections=count)
            for user_id, count in sorted(counts.items())
            if count > 0
        ]

    async def refresh(self, entries: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
        by_room: dict[str, list[str]] = {}
        for room, conn_id in entries:
            by_room.setdefault(room, []).append(conn_id)
        rooms = list(by_room.items())
        missing: list[tuple[str, str]] = []
        with _unavailable():
            for start in range(0, len(rooms), _PIPELINE_ROOMS):
                batch = rooms[start : start + _PIPELINE_ROOMS]
                replies = await self._each(
                    [(self._refresh, _keys(room)[1:2], list(conn_ids)) for room, conn_ids in batch]
                )
                for (room, _), gone in zip(batch, replies, strict=True):
                    missing.extend((room, conn_id.decode()) for conn_id in gone)
        return missing

    async def expire(self) -> list[tuple[str, UserInfo]]:
        timeout_ms = max(1, int(self.timeout * 1000))
        left: list[tuple[str, UserInfo]] = []
        with _unavailable():
            parts = await asyncio.gather(
                *(self._client.smembers(key) for key in self._rooms_keys())
            )
            pending = sorted(room.decode() for part in parts for room in cast(set[bytes], part))
            while pending:
                batch, pending = pending[:_PIPELINE_ROOMS], pending[_PIPELINE_ROOMS:]
                replies = await self._each(
                    [(self._expire, _keys(room), [timeout_ms, _EXPIRE_BATCH]) for room in batch]
                )
                for room, (removed, remaining, entries) in zip(batch, replies, strict=True):
                    left.extend((room, _user(entry)) for entry in entries)
                    if removed >= _EXPIRE_BATCH:
                        pending.append(room)  # more stale entries than one call takes
                    elif remaining == 0:
                        await self._forget_room(room)
        return left

    async def _each(self, calls: list[tuple[Any, list[str], list[Any]]]) -> list[Any]:
        """Scripts on many rooms: one pipeline on a single Redis; on a cluster, concurrent
        calls (each routed to its room's shard)."""
        if self._cluster:
            return list(
                await asyncio.gather(
                    *(script(keys=keys, args=args) for script, keys, args in calls)
                )
            )
        async with cast(aioredis.Redis, self._client).pipeline(transaction=False) as pipe:
            for script, keys, args in calls:
                await script(keys=keys, args=args, client=pipe)
            return await pipe.execute()

    async def _forget_room(self, room: str) -> None:
        """Drops an empty room from the set without losing a concurrent `add`: that one adds
        its entry before the room, so either the check below sees the entry or its SADD
        comes after our SREM."""
        await self._client.srem(self._rooms_key(room), room)
        if await self._client.exists(_keys(room)[0]):
            await self._client.sadd(self._rooms_key(room), room)

    def _rooms_key(self, room: str) -> str:
        if not self._cluster:
            return _ROOMS_KEY
        return f"{_ROOMS_KEY}:{{g{zlib.crc32(room.encode()) % _ROOM_GROUPS}}}"

    def _rooms_keys(self) -> list[str]:
        if not self._cluster:
            return [_ROOMS_KEY]
        return [f"{_ROOMS_KEY}:{{g{group}}}" for group in range(_ROOM_GROUPS)]
