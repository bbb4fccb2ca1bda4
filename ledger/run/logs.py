"""structlog configuration: JSON lines in production, readable lines in a terminal."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Any, TextIO

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _LineWriter(structlog.WriteLogger):
    """Writes each line to the stream; a line that cannot be written (its reader
    gone: EPIPE, a closed stream) is dropped, as the stdlib handler drops it,
    rather than raised into the request or the loop that logged it."""

    def msg(self, message: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            super().msg(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class _LineWriterFactory:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def __call__(self, *args: Any) -> _LineWriter:
        return _LineWriter(self.stream)


def configure(log_format: str = "json", level: str = "info") -> None:
    """Configure structlog and route stdlib logging (aiohttp, asyncpg) through it."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,  # request_id bound per request
        structlog.stdlib.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if log_format == "json":
        renderer = structlog.processors.JSONRenderer()
        shared.append(structlog.processors.format_exc_info)
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    # The ledger's own lines are rendered and written here, not routed through a
    # stdlib LogRecord and handler: the same line, at a fraction of the per-request
    # cost. Other libraries' stdlib logging goes through the handler below.
    structlog.configure(
        processors=[*shared, renderer],
        logger_factory=_LineWriterFactory(sys.stderr),
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
            foreign_pre_chain=shared,
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # aiohttp's access log duplicates our own request log line.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
