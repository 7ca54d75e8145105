"""Which backend a broker URL names: the one table, read by settings, wiring and tests.

As uvicorn's `config.py` maps `--ws` names to implementations in one place, this maps URL
schemes to backend kinds. A new backend (Redis Cluster, say) is a new kind here, its modules
beside the others (`broker_<kind>.py`, `presence_<kind>.py`), a branch in
`collab.realtime_wiring.build_backends`, and the shared behaviour suites run it through their
`backend_url` fixtures; nothing else names schemes.

The `redis_cluster` kind is built by the Redis modules themselves, in their cluster mode
(`broker_redis`, `presence_redis`, `user_connections_redis` read the scheme): the keys,
scripts and listener are the same, so a second copy of them would only drift.
"""

from __future__ import annotations

from typing import Literal

BackendKind = Literal["memory", "redis", "redis_cluster"]

SCHEMES: dict[str, BackendKind] = {
    "memory": "memory",  # one process: rooms, presence and feeds in memory
    "redis": "redis",
    "rediss": "redis",  # Redis over TLS
    "unix": "redis",  # Redis over a Unix socket
    # A Redis Cluster: redis+cluster://host:port[,host:port...] (any nodes; the rest are found)
    "redis+cluster": "redis_cluster",
    "rediss+cluster": "redis_cluster",  # over TLS
}


def backend_kind(url: str) -> BackendKind:
    """The kind of backend `url` names; ValueError naming the schemes there are."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    kind = SCHEMES.get(scheme)
    if kind is None:
        known = ", ".join(f"{s}://" for s in SCHEMES)
        raise ValueError(f"must start with one of {known}")
    return kind


def is_shared(url: str) -> bool:
    """True when the URL names a backend that several processes share (not memory)."""
    return backend_kind(url) != "memory"
