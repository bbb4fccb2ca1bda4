"""The in-process cache of budget definitions, kept fresh from the event log.

Loaded from every definition event (tags and templates, API keys, end users) at
start, then followed: a NOTIFY whose payload names one of those types wakes the
refresher at once; a poll every second covers a lost notification. A change
takes effect on every process within about a second, usually within
milliseconds (and a gateway that is a moment behind is corrected by the
counters' registry: see ledger/counters/).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime

import structlog

from ledger import events as ev
from ledger.counters import Budget, Counters, Limit
from ledger.counters.limits import limits_of as limits_from
from ledger.domain.windows import LIFETIME, Window
from ledger.events import RecordedEvent
from ledger.postgres.follow import FollowedCache
from ledger.postgres.store import EventStore
from ledger.subjects import DEFINITION_TYPES, Definitions, Spec
from ledger.tags import TagState

log = structlog.get_logger(__name__)


class BudgetBook(FollowedCache):
    types = DEFINITION_TYPES

    def __init__(self, store: EventStore, *, poll_interval_s: float = 1.0) -> None:
        super().__init__(store, poll_interval_s=poll_interval_s)
        self.definitions = Definitions()

    @property
    def tags(self) -> dict[str, TagState]:
        return self.definitions.tags

    def apply(self, recorded: RecordedEvent) -> None:
        self.definitions.apply(recorded)

    def get(self, name: str) -> TagState | None:
        state = self.definitions.tags.get(name)
        return state if state is not None and state.exists else None

    def specs_for(
        self,
        tags: Iterable[str],
        *,
        key_hash: str | None = None,
        user_hash: str | None = None,
        model: str | None = None,
        aliases: Sequence[str] = (),
    ) -> list[Spec]:
        return self.definitions.specs_for(list(tags), key_hash, user_hash, model, aliases)

    def budgets_for(
        self,
        tags: Iterable[str],
        now: datetime,
        *,
        key_hash: str | None = None,
        user_hash: str | None = None,
        model: str | None = None,
        aliases: Sequence[str] = (),
    ) -> list[Budget]:
        """The budgets in force for a request at ``now`` (in the order of its specs)."""
        specs = self.specs_for(tags, key_hash=key_hash, user_hash=user_hash, model=model, aliases=aliases)
        return budgets_at(specs, now)

    def budgets_of_subjects(self, subjects: Iterable[str], now: datetime) -> list[Budget]:
        """The budgets in force at ``now`` for these subjects (those that still have one)."""
        out = []
        for subject in dict.fromkeys(subjects):
            spec = self.definitions.spec(subject)
            budget = spec.budget(now) if spec is not None else None
            if budget is not None:
                out.append(budget)
        return out

    def budgets_of_windows(self, windows: Iterable[ev.BudgetWindow]) -> list[Budget]:
        """The counters a request reserved on, as recorded in its admission (limits do
        not matter any more: only reserves check them)."""
        return [Budget(w.subject, w.epoch, _window(w), 0) for w in windows]


def budgets_at(specs: Iterable[Spec], now: datetime) -> list[Budget]:
    return [b for s in specs if (b := s.budget(now)) is not None]


def limits_of(specs: Iterable[Spec]) -> list[Limit]:
    """The rate limits of these specs."""
    return [
        limit
        for s in specs
        for limit in limits_from(s.subject, s.limits.rpm, s.limits.tpm, s.limits.parallel)
    ]


def _window(w: ev.BudgetWindow) -> Window:
    if w.start == LIFETIME.start and w.end == LIFETIME.end:
        return LIFETIME
    return Window(w.start, w.end)


def window_ref(budget: Budget) -> ev.BudgetWindow:
    return ev.BudgetWindow(budget.subject, budget.epoch, budget.window.start, budget.window.end)


async def rebuild_missing(book: BudgetBook, counters: Counters, now: datetime) -> int:
    """Build every current window counter that Redis lacks, from the log. A live
    counter is never touched: it may hold reservations not yet in the log."""
    rebuilt = 0
    for spec in book.definitions.budgeted():
        budget = spec.budget(now)
        if budget is None:
            continue
        before = counters.rebuilds
        await counters.rebuild(budget)
        rebuilt += counters.rebuilds - before
    return rebuilt
