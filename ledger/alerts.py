"""Budget alerts: threshold crossings and burn-rate forecasts, each appended once.

Exactly once comes from the event store, not from a lock: every alert goes to a
stream named after its tag, window and threshold, at expected version 0, so a
second writer (another process, a re-applied batch) gets a ConcurrencyError and
moves on.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import Decimal

from ledger import events as ev
from ledger.domain.windows import LIFETIME, Window
from ledger.errors import ConcurrencyError
from ledger.postgres.store import EventStore
from ledger.tags import TagState


def forecast(
    spend: Decimal,
    max_budget: Decimal | None,
    window_start: datetime | None,
    reset_at: datetime | None,
    now: datetime,
) -> datetime | None:
    """When the budget runs out at the window's average burn rate so far, if
    that is before the window resets; else None."""
    if max_budget is None or window_start is None or reset_at is None or spend <= 0:
        return None
    elapsed = (now - window_start).total_seconds()
    if elapsed <= 0:
        return None
    if spend >= max_budget:
        return now
    seconds_left = float((max_budget - spend) / spend) * elapsed
    if seconds_left >= (reset_at - now).total_seconds():
        return None  # lasts past the reset (and a slow burn would overflow a datetime)
    return now + timedelta(seconds=seconds_left)


def _stamp(window: Window) -> int:
    return 0 if window == LIFETIME else int(window.start.timestamp())


async def _once(store: EventStore, stream: str, event: ev.Event, raised: set[str]) -> bool:
    if stream in raised:
        return False  # known to exist: no need to ask the database again
    raised.add(stream)
    try:
        await store.append(stream, 0, [ev.to_new(event)])
    except ConcurrencyError:
        return False  # someone already raised this one
    return True


async def check_window(
    store: EventStore,
    state: TagState,
    window: Window,
    before: Decimal,
    after: Decimal,
    now: datetime,
    raised: set[str] | None = None,
) -> int:
    """Append the alerts a window's spend moving from ``before`` to ``after`` raises."""
    assert state.max_budget is not None
    raised = set() if raised is None else raised  # alert streams known to exist
    reset_at = None if window == LIFETIME else window.end
    count = 0
    for threshold in state.thresholds:
        level = threshold * state.max_budget
        if before < level <= after:
            event = ev.BudgetThresholdCrossed(
                tag=state.name,
                window_start=window.start,
                reset_at=reset_at,
                threshold=threshold,
                kind="threshold",
                spend=after,
                max_budget=state.max_budget,
                soft_budget=state.soft_budget,
                at=now,
            )
            count += await _once(store, f"alert:{state.name}:{_stamp(window)}:{threshold}", event, raised)
    soft = state.soft_budget
    if soft is not None and before < soft <= after:
        event = ev.BudgetThresholdCrossed(
            tag=state.name,
            window_start=window.start,
            reset_at=reset_at,
            threshold=None,
            kind="soft_budget",
            spend=after,
            max_budget=state.max_budget,
            soft_budget=soft,
            at=now,
        )
        count += await _once(store, f"alert:{state.name}:{_stamp(window)}:soft", event, raised)
    if reset_at is not None and after < state.max_budget:
        predicted = forecast(after, state.max_budget, window.start, reset_at, now)
        if predicted is not None:
            event2 = ev.BudgetForecastExceeded(
                tag=state.name,
                window_start=window.start,
                reset_at=reset_at,
                predicted_at=predicted,
                spend=after,
                max_budget=state.max_budget,
                at=now,
            )
            count += await _once(store, f"forecast:{state.name}:{_stamp(window)}", event2, raised)
    return count
