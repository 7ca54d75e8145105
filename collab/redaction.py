"""Keeping credentials out of logs, on every way the server is started.

A browser can only put a WebSocket's credential in the URL, so servers log it with the
request line: uvicorn's "WebSocket /ws/chat?token=..." and its HTTP access line. `collab
serve` installs this filter through uvicorn's log config; under Gunicorn the worker class
installs it on the handlers Gunicorn hands to uvicorn (`collab.gunicorn_worker`).
"""

from __future__ import annotations

import logging
import re

_CREDENTIAL = re.compile(r"((?:token|ticket)=)[^&\s\"]+")


def redact(text: str) -> str:
    return _CREDENTIAL.sub(r"\1[redacted]", text)


class RedactTokens(logging.Filter):
    """Replaces the value of every `...token=` and `...ticket=` in a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        elif isinstance(record.msg, str):
            record.msg = redact(record.msg)
        return True


def install(*logger_names: str) -> None:
    """Put the filter on these loggers and on each of their handlers.

    On the handlers too, because a logger's filters do not see records that reach its
    handlers from child loggers.
    """
    redactor = RedactTokens()
    for name in logger_names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactTokens) for f in logger.filters):
            logger.addFilter(redactor)
        for handler in logger.handlers:
            if not any(isinstance(f, RedactTokens) for f in handler.filters):
                handler.addFilter(redactor)
