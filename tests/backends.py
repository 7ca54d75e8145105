"""The backend kinds the shared behaviour suites run on, from `realtime.backends.SCHEMES`.

A kind added there shows up here as a new parameter of every shared suite, and fails until
`backend_url` knows how to reach one: a backend cannot be added without passing the suites.
"""

from __future__ import annotations

import pytest

from realtime.backends import SCHEMES

KINDS = [
    pytest.param(kind, marks=[] if kind == "memory" else [getattr(pytest.mark, kind)])
    for kind in sorted(set(SCHEMES.values()))
]


def backend_url(request: pytest.FixtureRequest) -> str:
    """A URL of the parametrised kind, its service started or emptied for the test."""
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "redis":
        url: str = request.getfixturevalue("redis_url")
        return url
    if kind == "redis_cluster":
        cluster: str = request.getfixturevalue("redis_cluster_url")
        return cluster
    raise NotImplementedError(f"no test service for backend kind {kind!r}")
