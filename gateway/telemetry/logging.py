"""Structured JSON logs via structlog, one line per event on stdout.

The processor chain is short on purpose (it runs once per request for the
audit record): level filter, timestamp, exception formatting, redaction, then
orjson rendering straight to bytes.
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Any

import orjson
import structlog

from . import redact
from .redact import redact_processor

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def _timestamp(_logger: Any, _name: str, event: dict[str, Any]) -> dict[str, Any]:
    event["ts"] = round(time.time(), 6)
    return event


def _render(_logger: Any, _name: str, event: dict[str, Any]) -> bytes:
    return orjson.dumps(event, default=str)


def configure_logging(level: str = "info", cfg: Any = None, stream: Any = None) -> None:
    """``cfg``: the config's ``logging`` section (its ``redact`` additions), when there is one."""
    if cfg is not None:
        redact.configure(cfg.redact_fields, cfg.redact_patterns)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            redact_processor,
            _render,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.BytesLoggerFactory(file=stream or sys.stdout.buffer),
        cache_logger_on_first_use=True,
    )
    # Libraries that use stdlib logging (aiohttp, asyncio) go through the same redaction.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_StdlibJson())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").disabled = True


class _StdlibJson(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "event": "stdlib", "logger": record.name, "level": record.levelname.lower(),
            "message": record.getMessage(), "ts": round(record.created, 6),
        }
        if record.exc_info and record.exc_info[0] is not None:
            event["exc_type"] = record.exc_info[0].__name__
        return orjson.dumps(redact_processor(None, "", event), default=str).decode()
