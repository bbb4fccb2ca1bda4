"""The in-process cache of budget definitions, kept fresh from the event log.

Loaded from every tag event at start, then followed: a NOTIFY whose payload names
a tag event type wakes the refresher at once; a poll every second covers a lost
notification. A `/tag/update` therefore takes effect on every process within
about a second, usually within milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import structlog

from ledger import events as ev
from ledger.counters import Budget, Counters, tag_subject
from ledger.follow import FollowedCache
from ledger.money import limit_to_nanos
from ledger.store import EventStore, RecordedEvent
from ledger.tags import TagState
from ledger.windows import LIFETIME, Window

log = structlog.get_logger(__name__)


class BudgetBook(FollowedCache):
    types = ev.TAG_EVENT_TYPES

    def __init__(self, store: EventStore, *, poll_interval_s: float = 1.0) -> None:
        super().__init__(store, poll_interval_s=poll_interval_s)
        self.tags: dict[str, TagState] = {}
        self._cache: dict[str, tuple[TagState, Budget]] = {}

    def apply(self, recorded: RecordedEvent) -> None:
        event = ev.decode_tag(recorded)
        state = self.tags.get(event.name) or TagState(name=event.name, version=0)
        self.tags[event.name] = state.apply(event, recorded.version)

    def get(self, name: str) -> TagState | None:
        state = self.tags.get(name)
        return state if state is not None and state.exists else None

    def budgets_for(self, tags: Iterable[str], now: datetime) -> list[Budget]:
        """The budgets in force for these tags at ``now`` (tags without one are skipped)."""
        out: list[Budget] = []
        for name in dict.fromkeys(tags):
            state = self.tags.get(name)
            if state is None or not state.has_budget:
                continue
            # Reuse the Budget (and its key string) while the window and the
            # definition are unchanged: this runs for every request.
            cached = self._cache.get(name)
            if cached is not None and cached[0] is state and now in cached[1].window:
                out.append(cached[1])
                continue
            budget = budget_of(state, now)
            self._cache[name] = (state, budget)
            out.append(budget)
        return out

    def budgets_of_windows(self, windows: Iterable[ev.BudgetWindow]) -> list[Budget]:
        """The counters a request reserved on, as recorded in its admission, with
        today's limits (a limit only matters to reserve, and those are done)."""
        out = []
        for w in windows:
            window = _window(w)
            out.append(Budget(w.subject, w.epoch, window, 0))
        return out


def _window(w: ev.BudgetWindow) -> Window:
    if w.start == LIFETIME.start and w.end == LIFETIME.end:
        return LIFETIME
    return Window(w.start, w.end)


def budget_of(state: TagState, now: datetime) -> Budget:
    assert state.max_budget is not None
    return Budget(
        subject=tag_subject(state.name),
        epoch=state.budget_epoch,
        window=state.window(now),
        limit_nanos=limit_to_nanos(state.max_budget),
    )


def window_ref(budget: Budget) -> ev.BudgetWindow:
    return ev.BudgetWindow(budget.subject, budget.epoch, budget.window.start, budget.window.end)


async def rebuild_missing(book: BudgetBook, counters: Counters, now: datetime) -> int:
    """Build every current window counter that Redis lacks, from the log. A live
    counter is never touched: it may hold reservations not yet in the log."""
    rebuilt = 0
    for state in list(book.tags.values()):
        if not state.has_budget:
            continue
        budget = budget_of(state, now)
        before = counters.rebuilds
        await counters.rebuild(budget)
        rebuilt += counters.rebuilds - before
    return rebuilt
