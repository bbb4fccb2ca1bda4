"""Budget durations and the windows they cut time into.

Windows are computed at read time from a timestamp, never by a reset job:

* ``1d`` is the UTC calendar day; ``7d`` and ``1w`` the ISO week (from Monday);
  ``30d`` and ``1mo`` the calendar month;
* any other duration is a fixed window counted from the budget's anchor (its
  creation or its last change of duration).

Every window is half-open, ``[start, end)``, so consecutive windows tile time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

ACCEPTED_FORMS = (
    "Ns, Nm, Nh, Nd, Nw or Nmo with N a positive whole number (e.g. 30s, 15m, 1h, 1d, 7d, 1w, 1mo)"
)

_DURATION_RE = re.compile(r"([1-9][0-9]{0,5})(s|m|h|d|w|mo)")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
# Upper bounds keep every window well inside datetime's range (~10 years).
_MAX = {
    "s": 10 * 365 * 86400,
    "m": 10 * 365 * 1440,
    "h": 10 * 365 * 24,
    "d": 3650,
    "w": 520,
    "mo": 120,
}


class DurationError(ValueError):
    """A budget_duration that is not one of the accepted forms."""

    def __init__(self, field: str, value: object, why: str = "") -> None:
        detail = f" ({why})" if why else ""
        super().__init__(f"{field} must be one of {ACCEPTED_FORMS}; got {value!r}{detail}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Duration:
    count: int
    unit: str  # s, m, h, d, w, mo

    def __str__(self) -> str:
        return f"{self.count}{self.unit}"

    @property
    def kind(self) -> str:
        """'day', 'week', 'month' (calendar windows) or 'fixed'."""
        if (self.count, self.unit) == (1, "d"):
            return "day"
        if (self.count, self.unit) in ((7, "d"), (1, "w")):
            return "week"
        if (self.count, self.unit) in ((30, "d"), (1, "mo")):
            return "month"
        return "fixed"


def parse_duration(value: object, field: str = "budget_duration") -> Duration:
    if not isinstance(value, str):
        raise DurationError(field, value, "not a string")
    m = _DURATION_RE.fullmatch(value)
    if m is None:
        raise DurationError(field, value)
    count, unit = int(m[1]), m[2]
    if count > _MAX[unit]:
        raise DurationError(field, value, f"at most {_MAX[unit]}{unit}")
    return Duration(count, unit)


@dataclass(frozen=True, slots=True)
class Window:
    start: datetime
    end: datetime  # exclusive; also the moment the budget resets

    def __contains__(self, moment: datetime) -> bool:
        return self.start <= moment < self.end

    @property
    def key(self) -> str:
        """A compact name for counter keys: the start as epoch seconds."""
        return str(int(self.start.timestamp()))


# A budget without a duration never resets: one window for all time.
LIFETIME = Window(datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC))


def _utc(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: windows need timezone-aware timestamps")
    return moment.astimezone(UTC)


def _add_months(start: datetime, months: int) -> datetime:
    index = start.year * 12 + (start.month - 1) + months
    return start.replace(year=index // 12, month=index % 12 + 1)


def window_at(duration: Duration, anchor: datetime, now: datetime) -> Window:
    """The window of ``duration`` that contains ``now``."""
    now = _utc(now)
    kind = duration.kind
    if kind == "day":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return Window(start, start + timedelta(days=1))
    if kind == "week":
        day = now.replace(hour=0, minute=0, second=0, microsecond=0)
        start = day - timedelta(days=day.weekday())
        return Window(start, start + timedelta(days=7))
    if kind == "month":
        start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        return Window(start, _add_months(start, 1))
    anchor = _utc(anchor)
    if duration.unit == "mo":
        # N calendar months from the anchor's month start.
        base = anchor.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        months = (now.year - base.year) * 12 + (now.month - base.month)
        k = months // duration.count
        start = _add_months(base, k * duration.count)
        if start > now:  # only before the anchor's own month
            start = _add_months(start, -duration.count)
        return Window(start, _add_months(start, duration.count))
    length = timedelta(seconds=duration.count * _SECONDS[duration.unit])
    # Floor division on timedeltas handles instants before the anchor too.
    k = (now - anchor) // length
    start = anchor + k * length
    return Window(start, start + length)
