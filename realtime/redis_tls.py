"""TLS for Redis: the `ssl_*` options a `rediss://` or `rediss+cluster://` URL may carry,
read by one parser for a single Redis and a Redis Cluster alike.

redis-py reads a `rediss://` query itself, but leniently and late: a misspelt option reaches
the connection as an unexpected keyword at the first command, `ssl_check_hostname=flase`
counts as true, and its cluster client reads no query at all. Here every option is checked
when the settings load, with an error that names it; a TLS option on a plaintext URL is
refused rather than ignored, since ignoring it would connect in the clear.

Certificates are verified by default (`ssl_cert_reqs=required`, `ssl_check_hostname=true`):
against the system's CAs, plus `ssl_ca_certs` / `ssl_ca_data` / `ssl_ca_path` for a private CA.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from realtime.backends import backend_kind

TLS_SCHEMES = frozenset({"rediss", "rediss+cluster"})
_TRUE = frozenset({"true", "yes", "on", "1"})
_FALSE = frozenset({"false", "no", "off", "0"})
_CERT_REQS = ("none", "optional", "required")


def _text(name: str, value: str) -> str:
    return value


def _flag(name: str, value: str) -> bool:
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise ValueError(f"{name}={value!r}: not true or false")


def _cert_reqs(name: str, value: str) -> str:
    if value not in _CERT_REQS:
        raise ValueError(f"{name}={value!r}: must be one of {', '.join(_CERT_REQS)}")
    return value


def _file(name: str, value: str) -> str:
    if not Path(value).is_file():
        raise ValueError(f"{name}={value!r}: no such file")
    return value


def _directory(name: str, value: str) -> str:
    if not Path(value).is_dir():
        raise ValueError(f"{name}={value!r}: no such directory")
    return value


def _tls_version(name: str, value: str) -> ssl.TLSVersion:
    """`TLSv1_2` or `TLSv1_3` (or the number redis-py's own parser takes, 771 for TLS 1.2)."""
    try:
        return ssl.TLSVersion[value] if not value.isdigit() else ssl.TLSVersion(int(value))
    except (KeyError, ValueError):
        raise ValueError(f"{name}={value!r}: not a TLS version such as TLSv1_2") from None


def _verify_flags(name: str, value: str) -> list[ssl.VerifyFlags]:
    flags = []
    for flag in value.strip("[]").split(","):
        try:
            flags.append(ssl.VerifyFlags[flag.strip()])
        except KeyError:
            raise ValueError(f"{name}: {flag.strip()!r} is not an ssl.VerifyFlags name") from None
    return flags


# The options of redis-py's SSL connections, each with what checks and converts its value.
OPTIONS: dict[str, Callable[[str, str], Any]] = {
    "ssl_cert_reqs": _cert_reqs,
    "ssl_check_hostname": _flag,
    "ssl_ca_certs": _file,
    "ssl_ca_data": _text,
    "ssl_ca_path": _directory,
    "ssl_certfile": _file,
    "ssl_keyfile": _file,
    "ssl_password": _text,
    "ssl_min_version": _tls_version,
    "ssl_ciphers": _text,
    "ssl_include_verify_flags": _verify_flags,
    "ssl_exclude_verify_flags": _verify_flags,
}
# redis-py's cluster client (redis.asyncio.RedisCluster) has no argument for these.
NOT_ON_CLUSTER = frozenset({"ssl_ca_path", "ssl_password"})


def split_tls(url: str) -> tuple[str, dict[str, Any]]:
    """The URL without its `ssl_*` options, and those options as redis-py's keyword
    arguments: verifying by default on `rediss://` and `rediss+cluster://`, none on the
    plaintext schemes. ValueError naming the option for anything wrong.

    A cluster URL takes no other option (it has no databases, and redis-py's cluster client
    reads no query); a single Redis URL keeps its others (`db`, ...) for redis-py.
    """
    parts = urlsplit(url)
    cluster = backend_kind(url) == "redis_cluster"
    options: dict[str, Any] = {}
    kept: list[str] = []
    for piece in parts.query.split("&") if parts.query else []:
        pairs = parse_qsl(piece, keep_blank_values=True)
        name, value = pairs[0] if pairs else (piece, "")
        if not name.startswith("ssl_"):
            if cluster:
                raise ValueError(
                    f"a Redis Cluster URL takes only TLS options (ssl_...), not {name!r}"
                )
            kept.append(piece)
            continue
        if parts.scheme not in TLS_SCHEMES:
            raise ValueError(
                f"{name} is a TLS option: use rediss:// or rediss+cluster://, "
                f"not {parts.scheme}:// (which connects without TLS)"
            )
        check = OPTIONS.get(name)
        if check is None:
            raise ValueError(f"unknown TLS option {name!r}; known: {', '.join(OPTIONS)}")
        if cluster and name in NOT_ON_CLUSTER:
            raise ValueError(
                f"{name} is not supported on a Redis Cluster (redis-py's cluster client "
                "has no such option)"
            )
        if name in options:
            raise ValueError(f"{name} is given twice")
        options[name] = check(name, value)
    if "ssl_keyfile" in options and "ssl_certfile" not in options:
        raise ValueError("ssl_keyfile needs ssl_certfile (the client certificate)")
    if parts.scheme in TLS_SCHEMES:
        options = {"ssl_cert_reqs": "required", "ssl_check_hostname": True, **options}
    return urlunsplit(parts._replace(query="&".join(kept))), options
