"""Every setting the server reads, in one place, from `COLLAB_*` environment variables.

Nothing here is read at import time: `Settings()` is built by the CLI (or a test) and handed
to `create_app`, so one process can host several differently configured apps.
"""

from __future__ import annotations

import re
import secrets
import socket
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from realtime.backends import backend_kind, is_shared
from realtime.protocol import NAME_PATTERN
from realtime.redis_tls import split_tls

# Values that appear in docs and examples; a production server must never run on one.
KNOWN_DEFAULT_SECRETS = frozenset(
    {"", "changeme", "change-me", "secret", "dev", "development", "collab", "please-change-me"}
)
MIN_SECRET_LENGTH = 32


def _default_node_id() -> str:
    return socket.gethostname()


class Settings(BaseSettings):
    """The server's configuration. Field names map to `COLLAB_<NAME>` variables."""

    model_config = SettingsConfigDict(
        env_prefix="COLLAB_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        validate_default=True,
    )

    env: Literal["development", "production", "test"] = "development"
    database_url: str = "sqlite+aiosqlite:///./collab.db"
    broker_url: str = "memory://"
    celery_broker_url: str | None = None
    secret_key: SecretStr | None = None
    allowed_origins: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["*"])
    node_id: str = Field(default_factory=_default_node_id, min_length=1, max_length=128)
    guest_access: bool = True

    access_token_minutes: int = Field(default=60 * 24, ge=1, le=60 * 24 * 365)
    # Login, registration and guest-token requests per second per client address.
    auth_rate_limit: float = Field(default=5.0, gt=0)
    auth_rate_burst: int = Field(default=20, ge=1)
    # Sign-in attempts on one username without a success, shared by every node through Redis
    # when the broker is Redis (the `limits` notation: "10 per 5 minutes", "20/hour").
    login_failure_limit: str = "10 per 5 minutes"
    # Argon2 hashes (64 MiB each) one process runs at once, and how many more may wait; a
    # request beyond both gets 503 with Retry-After.
    password_hash_concurrency: int = Field(default=2, ge=1, le=64)
    password_hash_queue: int = Field(default=16, ge=0, le=10_000)
    # How long a WebSocket connection ticket (POST /auth/ws-ticket) stays valid; it works once.
    ws_ticket_seconds: float = Field(default=30.0, ge=1, le=300)
    # How long a request waits for the database (a pooled connection; on SQLite also its turn
    # to write) before it is answered 503 with Retry-After.
    database_busy_timeout: float = Field(default=10.0, gt=0, le=600)
    # How long a WebSocket connect may rely on a remembered account (id, token version, name,
    # role) instead of reading its row; 0: read it on every connect (`api/accounts.py`).
    account_cache_seconds: float = Field(default=10.0, ge=0, le=3600)
    # Freeze long-lived objects (connections, presence) so that garbage collections do not
    # walk them: full passes otherwise stall deliveries for 100 ms and more (collab/gc_pauses.py).
    gc_freeze: bool = True
    # The REST API's pages (/docs, /redoc, /openapi.json); unset: on except in production.
    api_docs: bool | None = None
    presence_timeout: float = Field(default=30.0, gt=0, le=3600)
    rate_limit: float = Field(default=20.0, gt=0)
    rate_burst: int = Field(default=50, ge=1)
    max_body_bytes: int = Field(default=16 * 1024, ge=64)
    max_frame_bytes: int = Field(default=64 * 1024, ge=256)
    max_connections_per_user: int = Field(default=20, ge=1)
    max_connections: int = Field(default=10_000, ge=1)
    heartbeat: float = Field(default=25.0, gt=0, le=3600)
    outgoing_queue_bytes: int = Field(default=1024 * 1024, ge=1024)
    # Seconds a close decided by the server (4408 too slow, 4401 token expired) may wait
    # behind what the client has not read; then the socket is dropped without it.
    close_timeout: float = Field(default=30.0, gt=0, le=600)
    # The most one reply may hold (a history page, a join's `missed`, a feed snapshot); never
    # more than the outgoing queue, which it counts against.
    max_reply_bytes: int = Field(default=512 * 1024, ge=4096)
    # Rooms and feeds one WebSocket may have joined at once (too_many_channels past it).
    max_channels_per_connection: int = Field(default=128, ge=1, le=100_000)
    # Feeds any authenticated user may subscribe to: names, or prefixes ending in `*`
    # (comma-separated). Every other feed is for service and admin tokens only.
    public_feeds: Annotated[list[str], NoDecode] = Field(default_factory=lambda: ["items", "stats"])
    # Non-public feeds granted to some users or roles, as JSON:
    # {"team.*": ["role:user"], "ops.alerts": ["user:42"]}. Services and admins need none.
    feed_grants: dict[str, list[str]] = Field(default_factory=dict)
    # Bytes a room or feed may hold while this node recovers a gap in its stream; past it,
    # its members are closed (1011) and recover on reconnect.
    recovery_backlog_bytes: int = Field(default=8 * 1024 * 1024, ge=64 * 1024)
    history_window: int = Field(default=1000, ge=0)
    # A room's or feed's broker state (epoch, offset, recent window) is dropped after this many
    # seconds without a publication (0: kept for ever), so Redis does not keep every room ever
    # used; the room comes back with a new epoch (clients get `recovered: false`; history is
    # in the database). Never while a room holds messages not yet confirmed stored. The
    # default is Centrifugo's `history_meta_ttl` (30 days).
    room_state_ttl: float = Field(default=30 * 86_400, ge=0, le=10 * 365 * 86_400)
    shutdown_timeout: float = Field(default=10.0, ge=0)
    auto_migrate: bool | None = Field(
        default=None,
        description="Bring the schema up to date at startup; defaults to on for SQLite only.",
    )

    # Persistence (docs/PERSISTENCE.md). A batch closes after this many messages or this many
    # seconds, whichever comes first; both sinks (in-process and Celery) batch the same way.
    persist_batch_size: int = Field(default=500, ge=1, le=10_000)
    persist_batch_delay: float = Field(default=0.005, ge=0, le=1)
    # The Celery sink answers `unavailable` when the broker has not taken a batch in this time.
    celery_send_timeout: float = Field(default=5.0, gt=0, le=300)
    celery_queue: str = Field(default="collab.messages", pattern=r"^[A-Za-z0-9_.:-]{1,128}$")
    # RabbitMQ only. "quorum": the queue is replicated over a RabbitMQ cluster (Raft) and
    # survives the loss of a minority of its nodes; "classic" lives on one node. A queue's
    # type is fixed when it is first declared: switching needs a new COLLAB_CELERY_QUEUE.
    celery_queue_type: Literal["classic", "quorum"] = "classic"
    # Merged over the defaults for the broker (a JSON object), for example
    # {"visibility_timeout": 3600} for Redis. Redis's visibility timeout must stay above
    # celery_retry_backoff_max, or a batch waiting for its retry is delivered twice.
    celery_broker_transport_options: dict[str, Any] = Field(default_factory=dict)
    # A worker retries a batch while the database is unreachable, waiting up to this long.
    celery_retry_backoff_max: int = Field(default=60, ge=1, le=3600)
    # The in-process sink: at most this many messages wait for a write, each at most this long.
    persist_max_pending: int = Field(default=10_000, ge=1)
    persist_timeout: float = Field(default=10.0, gt=0, le=300)
    # The reconciler (docs/PERSISTENCE.md): a published message still not stored after
    # `reconcile_grace` seconds is stored again from the broker's window; passes run every
    # `reconcile_interval` seconds. The window keeps a room's unconfirmed messages, but at
    # most `max_unconfirmed` of them (past that the oldest are lost and reported).
    reconcile_grace: float = Field(default=60.0, ge=0, le=86_400)
    reconcile_interval: float = Field(default=5.0, gt=0, le=3600)
    # The built-in `stats` feed (realtime/stats_feed.py): each node publishes its numbers
    # this often, in seconds; 0 turns it off.
    stats_feed_interval: float = Field(default=1.0, ge=0, le=3600)
    max_unconfirmed: int = Field(default=100_000, ge=1, le=10_000_000)
    # When set, `collab worker` serves Prometheus metrics (batch size, lag) on this port.
    celery_metrics_port: int | None = Field(default=None, ge=1, le=65535)
    # The address that port listens on: loopback unless a scraper elsewhere needs it.
    celery_metrics_address: str = Field(default="127.0.0.1", min_length=1, max_length=255)

    @field_validator("allowed_origins", mode="before")
    @classmethod
    def _split_origins(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("login_failure_limit")
    @classmethod
    def _rate_limit_notation(cls, value: str) -> str:
        import limits

        try:
            limits.parse(value)
        except ValueError:
            raise ValueError('must be a rate such as "10 per 5 minutes" or "20/hour"') from None
        return value

    @field_validator("public_feeds", mode="before")
    @classmethod
    def _split_feeds(cls, value: object) -> object:
        if isinstance(value, str):
            value = [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list):
            for rule in value:
                name = rule[:-1] if isinstance(rule, str) and rule.endswith("*") else rule
                if not isinstance(name, str) or (name and not re.fullmatch(NAME_PATTERN, name)):
                    raise ValueError(f"not a feed name or prefix (name or prefix*): {rule!r}")
        return value

    @field_validator("feed_grants")
    @classmethod
    def _check_grants(cls, value: dict[str, list[str]]) -> dict[str, list[str]]:
        cls._split_feeds(list(value))
        for rule, holders in value.items():
            for holder in holders:
                kind, _, name = holder.partition(":")
                if kind not in ("user", "role") or not name:
                    raise ValueError(
                        f"grant of {rule!r}: {holder!r} is not 'user:<id>' or 'role:<role>'"
                    )
        return value

    @field_validator("database_url", "broker_url")
    @classmethod
    def _has_scheme(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError("must be a URL with a scheme, such as sqlite+aiosqlite:///./collab.db")
        return value

    @field_validator("celery_broker_url")
    @classmethod
    def _known_celery_broker(cls, value: str | None) -> str | None:
        if value is None or value == "":
            return None
        scheme = value.split("://", 1)[0] if "://" in value else ""
        if scheme not in ("redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps", "pyamqp"):
            raise ValueError(
                "must start with redis://, rediss://, sentinel://, amqp:// or amqps://"
            )
        return value

    @field_validator("broker_url")
    @classmethod
    def _known_broker(cls, value: str) -> str:
        backend_kind(value)  # the one table of schemes; raises naming them
        split_tls(value)  # raises naming a TLS option that is wrong or unknown
        return value

    @field_validator("database_url")
    @classmethod
    def _async_driver(cls, value: str) -> str:
        scheme = value.split("://", 1)[0]
        if scheme not in (
            "sqlite+aiosqlite",
            "postgresql+asyncpg",
            "mysql+aiomysql",
            "mysql+asyncmy",
        ):
            raise ValueError(
                "must name an async driver: sqlite+aiosqlite://, postgresql+asyncpg:// "
                "or mysql+aiomysql://"
            )
        return value

    @model_validator(mode="after")
    def _quorum_needs_rabbitmq(self) -> Settings:
        # Redis has no queue types; accepting the setting there would promise a replication
        # nothing provides.
        if self.celery_queue_type == "quorum" and not (
            self.celery_broker_url
            and self.celery_broker_url.split("://", 1)[0] in ("amqp", "amqps", "pyamqp")
        ):
            raise ValueError(
                "COLLAB_CELERY_QUEUE_TYPE=quorum needs RabbitMQ as COLLAB_CELERY_BROKER_URL "
                "(amqp:// or amqps://)"
            )
        return self

    @model_validator(mode="after")
    def _reply_holds_messages(self) -> Settings:
        # A history page or a recovery always carries at least one message.
        if self.max_reply_bytes < 4 * self.max_body_bytes:
            raise ValueError(
                "COLLAB_MAX_REPLY_BYTES must be at least 4 x COLLAB_MAX_BODY_BYTES "
                f"({4 * self.max_body_bytes})"
            )
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_production(self) -> Settings:
        if self.env != "production":
            if self.secret_key is None:
                # A fresh key per start: tokens die with the process, which is what a
                # development server should do rather than share a guessable key.
                self.secret_key = SecretStr(secrets.token_urlsafe(48))
            return self
        key = self.secret_key.get_secret_value() if self.secret_key else ""
        if key.lower() in KNOWN_DEFAULT_SECRETS or len(key) < MIN_SECRET_LENGTH:
            raise ValueError(
                "COLLAB_SECRET_KEY must be set to a random value of at least "
                f"{MIN_SECRET_LENGTH} characters when COLLAB_ENV=production "
                "(for example: python -c 'import secrets; print(secrets.token_urlsafe(48))')"
            )
        if "*" in self.allowed_origins:
            raise ValueError(
                "COLLAB_ALLOWED_ORIGINS must list the sites allowed to open WebSockets "
                "when COLLAB_ENV=production (a comma-separated list), not '*'"
            )
        return self

    def refuse_processes(self, processes: int) -> str | None:
        """Why `processes` server processes may not run on these settings, or None.

        Each process is a node. On the memory broker nodes share nothing: every room would
        exist once per process, with its own offsets and members, and nothing would say so.
        Several processes need a broker they share (DESIGN: "scale-up is scale-out").
        """
        if processes <= 1 or is_shared(self.broker_url):
            return None
        return (
            f"{processes} server processes need a shared broker: with COLLAB_BROKER_URL="
            f"{self.broker_url} each process would hold its own copy of every room (split "
            "rooms, repeated offsets). Run one process, or share rooms through Redis:\n"
            "  COLLAB_BROKER_URL=redis://127.0.0.1:6379/0 collab serve --workers "
            f"{processes}"
        )

    @property
    def secret(self) -> str:
        """The signing key; always set once validation has run."""
        assert self.secret_key is not None
        return self.secret_key.get_secret_value()

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def serves_api_docs(self) -> bool:
        return self.env != "production" if self.api_docs is None else self.api_docs

    @property
    def should_auto_migrate(self) -> bool:
        return self.is_sqlite if self.auto_migrate is None else self.auto_migrate
