"""structlog set-up: readable in a terminal, JSON lines otherwise (production, CI logs).

`request_id` is bound with structlog's contextvars, so every event logged while a
request is handled carries it, in every service.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog


def configure_logging(service: str, level: str | None = None) -> structlog.stdlib.BoundLogger:
    level_name = (level or os.environ.get("PDSERVE_LOG_LEVEL", "info")).upper()
    as_json = os.environ.get("PDSERVE_LOG_FORMAT", "auto")
    use_json = as_json == "json" or (as_json == "auto" and not sys.stderr.isatty())
    renderer = structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso"),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level_name]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Bound in the context so module-level loggers (and tasks started later) carry it too.
    structlog.contextvars.bind_contextvars(service=service)
    return structlog.get_logger()


def set_log_level(level: str) -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]))
