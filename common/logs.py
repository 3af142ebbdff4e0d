"""Logging as one JSON object per line, carrying the correlation and notification ids in scope."""

from __future__ import annotations

import contextvars
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson

CORRELATION_HEADER = "X-Correlation-ID"

correlation_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "correlation_id", default=None
)
notification_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "notification_id", default=None
)
# The project a request, a message or a loop's row acts for: set by the auth middleware (from
# the principal), by a worker (from its job) and by the gateway's loops (from each row), and
# carried to the user and template services on every call (`X-Project`), so every query there
# is scoped by it. "default" for a deployment that never names one.
PROJECT_HEADER = "X-Project"
DEFAULT_PROJECT = "default"
project_var: contextvars.ContextVar[str] = contextvars.ContextVar("project", default=DEFAULT_PROJECT)

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        correlation_id = getattr(record, "correlation_id", None) or correlation_id_var.get()
        notification_id = getattr(record, "notification_id", None) or notification_id_var.get()
        if correlation_id:
            entry["correlation_id"] = correlation_id
        if notification_id:
            entry["notification_id"] = notification_id
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in entry and value is not None:
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        ids = [
            f"{name}={value}"
            for name in ("correlation_id", "notification_id")
            if (value := getattr(record, name, None))
        ]
        return f"{line} [{' '.join(ids)}]" if ids else line


_factory_installed = False


def install_record_factory() -> None:
    """Stamp the ids in scope onto each record when it is made, so any handler (and pytest's
    caplog) sees them, not only ours at format time. Idempotent."""
    global _factory_installed
    if _factory_installed:
        return
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        if not hasattr(record, "correlation_id"):
            record.correlation_id = correlation_id_var.get()
        if not hasattr(record, "notification_id"):
            record.notification_id = notification_id_var.get()
        return record

    logging.setLogRecordFactory(factory)
    _factory_installed = True


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    install_record_factory()
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiohttp's access log repeats what our metrics already count, once per request.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@contextmanager
def log_context(correlation_id: str | None = None, notification_id: str | None = None) -> Iterator[None]:
    """Bind ids for every log line written inside the block (and the tasks it starts)."""
    tokens = []
    if correlation_id is not None:
        tokens.append((correlation_id_var, correlation_id_var.set(correlation_id)))
    if notification_id is not None:
        tokens.append((notification_id_var, notification_id_var.set(notification_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)
