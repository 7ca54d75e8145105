"""`collab serve | migrate | worker`: how operators and tests start the server."""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from collab.settings import Settings


def _settings() -> Settings:
    try:
        return Settings()
    except ValidationError as exc:
        lines = [
            f"  {'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors()
        ]
        sys.stderr.write("collab: invalid configuration (COLLAB_* variables):\n")
        sys.stderr.write("\n".join(lines) + "\n")
        raise SystemExit(2) from None


def _log_config() -> dict[str, object]:
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_tokens": {"()": "collab.redaction.RedactTokens"}}
    for handler in config["handlers"].values():
        handler["filters"] = ["redact_tokens"]
    return config


def serve(host: str, port: int, workers: int, log_level: str) -> None:
    import uvicorn

    settings = _settings()  # fail fast, before uvicorn forks workers
    refusal = settings.refuse_processes(workers)
    if refusal is not None:
        sys.stderr.write(f"collab serve: {refusal}\n")
        raise SystemExit(2)
    os.environ["COLLAB_PORT"] = str(port)
    if settings.env == "development" and not os.environ.get("COLLAB_SECRET_KEY"):
        # One random key for every worker of this run, so their tokens agree.
        import secrets

        os.environ["COLLAB_SECRET_KEY"] = secrets.token_urlsafe(48)
    if settings.should_auto_migrate:
        from persistence import migrate

        migrate.upgrade(settings.database_url)
        # Done once here, so several workers do not race to migrate the same file.
        os.environ["COLLAB_AUTO_MIGRATE"] = "false"
    from collab.websocket_protocol import protocol_classes

    http_protocol, ws_protocol = protocol_classes()
    uvicorn.run(
        "collab.app:create_app_from_env",
        factory=True,
        host=host,
        port=port,
        workers=workers,
        log_level=log_level,
        proxy_headers=True,
        log_config=_log_config(),
        http=http_protocol,
        ws=ws_protocol,
        ws_per_message_deflate=False,
        ws_max_size=settings.max_frame_bytes,
        # The app sends its own heartbeats; uvicorn's pings would double them.
        ws_ping_interval=settings.heartbeat,
        ws_ping_timeout=settings.heartbeat,
        timeout_graceful_shutdown=int(settings.shutdown_timeout) or None,
    )


def migrate_command() -> None:
    from persistence import migrate

    settings = _settings()
    migrate.upgrade(settings.database_url)
    print(f"collab: database schema is up to date ({_redact(settings.database_url)})")


def worker_command(argv: Sequence[str]) -> None:
    """A Celery worker that stores message batches; `argv` goes to `celery worker` as is
    (for example `--concurrency 2 --pool prefork`)."""
    settings = _settings()
    if not settings.celery_broker_url:
        sys.stderr.write(
            "collab worker: COLLAB_CELERY_BROKER_URL is not set. Set it (redis://... or\n"
            "amqp://...) for the worker and every `collab serve`; without it, the server stores\n"
            "messages in-process and needs no worker.\n"
        )
        raise SystemExit(2)
    try:
        from workers.app import create_worker_app

        app = create_worker_app(settings)
    except ImportError as exc:
        sys.stderr.write(
            f"collab worker: {exc}; install the production extra: "
            "pip install 'collab[production]'\n"
        )
        raise SystemExit(2) from None
    args = list(argv)
    if args[:1] == ["--"]:
        args = args[1:]
    if not any(a in ("-l", "--loglevel") or a.startswith(("-l", "--loglevel=")) for a in args):
        args = ["--loglevel", "INFO", *args]
    code = app.worker_main(["worker", *args])
    if isinstance(code, int) and code:
        raise SystemExit(code)


def create_user_command(username: str, role: str) -> None:
    """The password is read from standard input, so it stays out of shell history and `ps`."""
    from collab.admin import AdminError, create_user_sync

    settings = _settings()
    if settings.should_auto_migrate:
        from persistence import migrate

        migrate.upgrade(settings.database_url)
    password = sys.stdin.readline().rstrip("\n")
    try:
        user_id = create_user_sync(settings, username, password, role)
    except AdminError as exc:
        sys.stderr.write(f"collab create-user: {exc}\n")
        raise SystemExit(2) from None
    print(f"collab: created {role} {username!r} with id {user_id}")


def storage_check_command(rooms: list[str] | None, since: str | None, repair: bool) -> None:
    from collab.storage_check import parse_duration, run
    from realtime.protocol import is_valid_name

    settings = _settings()
    try:
        if since is not None:
            parse_duration(since)
        for room in rooms or []:
            if not is_valid_name(room):
                raise ValueError(f"not a room name: {room!r}")
    except ValueError as exc:
        sys.stderr.write(f"collab storage check: {exc}\n")
        raise SystemExit(2) from None
    raise SystemExit(run(settings, rooms, since, repair))


def _redact(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def main(argv: Sequence[str] | None = None) -> None:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["worker"]:
        # Everything after `worker` is Celery's; argparse would reorder its options.
        worker_command(arguments[1:])
        return
    parser = argparse.ArgumentParser(prog="collab", description="Collab real-time server")
    sub = parser.add_subparsers(dest="command", required=True)
    p_serve = sub.add_parser("serve", help="run the server (REST, /ws/chat, /ws/live, pages)")
    p_serve.add_argument("--host", default="127.0.0.1")
    p_serve.add_argument("--port", type=int, default=8000)
    p_serve.add_argument("--workers", type=int, default=1)
    p_serve.add_argument("--log-level", default="info")
    sub.add_parser("migrate", help="bring the database schema up to date")
    p_user = sub.add_parser(
        "create-user", help="create a user, service or admin account (password on stdin)"
    )
    p_user.add_argument("username")
    p_user.add_argument("--role", choices=["user", "service", "admin"], default="user")
    p_storage = sub.add_parser("storage", help="storage checks")
    storage = p_storage.add_subparsers(dest="storage_command", required=True)
    p_check = storage.add_parser(
        "check",
        help="compare published against stored messages; exit 1 when there are gaps",
    )
    p_check.add_argument("--room", action="append", help="only this room (repeatable)")
    p_check.add_argument("--since", help="only messages of this recent period (90s, 15m, 2h, 7d)")
    p_check.add_argument(
        "--repair", action="store_true", help="store what the broker's window still holds"
    )
    p_worker = sub.add_parser("worker", help="run a Celery worker that stores messages")
    p_worker.add_argument("celery_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(arguments)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if args.command == "serve":
        if not 0 < args.port < 65536 or args.workers < 1:
            parser.error("--port must be 1-65535 and --workers at least 1")
        serve(args.host, args.port, args.workers, args.log_level)
    elif args.command == "migrate":
        migrate_command()
    elif args.command == "create-user":
        create_user_command(args.username, args.role)
    elif args.command == "storage":
        storage_check_command(args.room, args.since, args.repair)
    else:
        worker_command(args.celery_args)
