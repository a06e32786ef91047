"""The session a log line is about, on every line: a context variable set where a request
or a task starts working for a session, and a filter that puts it in front of messages."""
from __future__ import annotations

import logging
from contextvars import ContextVar

SESSION: ContextVar[str | None] = ContextVar("lipsync_session", default=None)


class SessionFilter(logging.Filter):
    """Prefixes a record's message with ``[session id]`` when one is in context."""

    def filter(self, record: logging.LogRecord) -> bool:
        session = SESSION.get()
        if session is not None and not getattr(record, "session_tagged", False):
            record.msg = f"[{session}] {record.msg}"
            record.session_tagged = True  # a record passes each handler's filters: tag it once
        return True


def install(logger: logging.Logger | None = None) -> None:
    """Tag the lines of every handler of ``logger`` (the root by default). Idempotent."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        if not any(isinstance(f, SessionFilter) for f in handler.filters):
            handler.addFilter(SessionFilter())
