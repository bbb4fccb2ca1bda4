"""Background loops: one way to run a step forever and to stop it on shutdown.

Every loop the gateway keeps (the sweeper, the counter reconcile, the lag gauges)
logs and retries what fails, and ends on a cancellation, even one the driver
surfaced as a connection error (asyncpg does), so app shutdown never hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import structlog

log = structlog.get_logger(__name__)


def cancelling() -> bool:
    """Whether the current task is being cancelled (asyncpg may surface a cancel
    as a connection error; loops that swallow errors must not swallow that)."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


async def run_forever(
    step: Callable[[], Awaitable[object]],
    interval_s: float,
    *,
    error_event: str | None,
    level: Literal["info", "warning"] = "warning",
) -> None:
    """Wait ``interval_s``, run ``step``, again, forever. A step that fails is
    logged as ``error_event`` (None: silently) and tried again next interval."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await step()
        except Exception as e:
            if cancelling():
                raise asyncio.CancelledError from e
            if error_event is not None:
                getattr(log, level)(error_event, error=f"{type(e).__name__}: {e}")


@contextlib.asynccontextmanager
async def background(name: str, loop: Awaitable[None], stop_timeout_s: float = 5.0) -> AsyncIterator[None]:
    """Run ``loop`` as a task for the life of the block; cancel it at the end and
    wait for it, bounded: a cancellation swallowed somewhere inside must not hold
    a shutdown forever."""
    task = asyncio.ensure_future(loop)
    task.set_name(name)
    try:
        yield
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=stop_timeout_s)
