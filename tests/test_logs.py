"""Log lines: the ledger's own structlog lines as configured by `ledger serve`/`dev`."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest
import structlog

from ledger.run import logs


class _Broken(io.StringIO):
    """stderr whose reader went away (a log shipper died: EPIPE)."""

    def write(self, s: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")


@pytest.fixture
def restored() -> Iterator[None]:
    config = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    structlog.configure(**config)
    root.handlers[:], root.level = handlers, level


def test_a_line_is_one_json_object_with_the_bound_request_id(
    restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stderr", out)
    logs.configure("json", "info")
    structlog.contextvars.bind_contextvars(request_id="r-1")
    try:
        structlog.get_logger("t").warning("hello", n=1)
        structlog.get_logger("t").debug("filtered")
    finally:
        structlog.contextvars.clear_contextvars()
    [line] = out.getvalue().splitlines()
    entry = json.loads(line)
    assert {k: entry[k] for k in ("event", "level", "request_id", "n")} == {
        "event": "hello",
        "level": "warning",
        "request_id": "r-1",
        "n": 1,
    }
    assert "timestamp" in entry


def test_a_line_that_cannot_be_written_does_not_fail_the_caller(
    restored: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the stdlib handler a write error was reported and dropped; written
    directly, it raised out of the log call: out of the request log line of the
    middleware (a response lost after the charge) or a sweeper's item."""
    monkeypatch.setattr(sys, "stderr", _Broken())
    logs.configure("json", "info")
    structlog.get_logger("t").info("request", status=200)
    logging.getLogger("aiohttp.server").error("stdlib lines are dropped too")
