"""In-memory caches kept fresh from the log: load some event types, then follow.

A NOTIFY whose payload names one of the types wakes the refresher at once; a
poll every ``poll_interval_s`` covers a lost notification. Budget definitions
and API keys are such caches.
"""

from __future__ import annotations

import asyncio

import structlog

from ledger.events import RecordedEvent
from ledger.loops import cancelling
from ledger.postgres.store import CHANNEL, EventStore, Notifications, payload_types

log = structlog.get_logger(__name__)


class FollowedCache:
    types: tuple[str, ...] = ()

    def __init__(self, store: EventStore, *, poll_interval_s: float = 1.0) -> None:
        self.store = store
        self.poll_interval_s = poll_interval_s
        self.position = 0
        self._task: asyncio.Task[None] | None = None

    def apply(self, recorded: RecordedEvent) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        await self.refresh()
        self._task = asyncio.create_task(self._follow(), name=f"follow-{type(self).__name__}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=5)  # bounded, whatever the driver does
            self._task = None

    async def refresh(self) -> int:
        """Apply the events committed since the last refresh; return how many."""
        applied = 0
        while batch := await self.store.read_types(self.types, self.position, 1000):
            for recorded in batch:
                self.apply(recorded)
                self.position = recorded.position
            applied += len(batch)
        return applied

    async def _follow(self) -> None:
        mine = set(self.types)
        async with Notifications(self.store.pool, CHANNEL, lambda p: bool(payload_types(p) & mine)) as wake:
            while True:
                await wake.wait(self.poll_interval_s)
                try:
                    await self.refresh()
                except Exception as e:  # keep serving the last known state
                    if cancelling():
                        raise asyncio.CancelledError from e  # the driver turned our cancel into an error
                    log.warning("cache_refresh_failed", cache=type(self).__name__, error=str(e))
