"""A budget in force for one window: what a counter enforces."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from ledger.counters import keys
from ledger.domain.windows import LIFETIME, Window


@dataclass(frozen=True, slots=True)
class Budget:
    subject: str  # what the budget is attached to: "tag:<name>", "key:<hash>", ... (ledger/subjects.py)
    epoch: int  # the definition's budget epoch (ledger/subjects.py)
    window: Window
    limit_nanos: int
    # A spend reset inside this window: charges admitted before ``since`` do not
    # count, ``base_nanos`` counts in their place.
    since: datetime | None = None
    base_nanos: int = 0
    key: str = field(init=False, compare=False)  # the window counter's Redis key
    gen_key: str = field(init=False, compare=False)
    reg_key: str = field(init=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "key", keys.counter(self.subject, self.epoch, self.window_stamp))
        object.__setattr__(self, "gen_key", keys.generation(self.subject))
        object.__setattr__(self, "reg_key", keys.registry(self.subject))

    @property
    def counts_from(self) -> datetime:
        """The earliest admission time this window's counter counts."""
        return self.since if self.since is not None else self.window.start

    @property
    def registry_entry(self) -> str:
        """What the subject's registry says of this counter: window (ms), epoch, limit,
        and a spend reset (since, ms; base, nanos)."""
        w = self.window
        since = _ms(self.since) if self.since is not None else 0
        return f"{_ms(w.start)}|{_ms(w.end)}|{self.epoch}|{self.limit_nanos}|{since}|{self.base_nanos}"

    @classmethod
    def from_registry(cls, key: str, entry: str) -> Budget:
        parsed = keys.parse_counter(key)
        start, end, epoch, limit, since, base = ([*entry.split("|"), "0", "0"])[:6]
        if parsed is None or int(epoch) != parsed.epoch:
            raise ValueError(f"registry entry {entry!r} does not match counter {key!r}")
        window = Window(_from_ms(int(start)), _from_ms(int(end)))
        if window == LIFETIME:
            window = LIFETIME
        return cls(
            parsed.subject,
            parsed.epoch,
            window,
            int(limit),
            _from_ms(int(since)) if int(since) else None,
            int(base),
        )

    @property
    def window_stamp(self) -> int:
        return 0 if self.window == LIFETIME else int(self.window.start.timestamp())

    @property
    def name(self) -> str:
        """The subject without its kind: the tag's name for a tag budget."""
        return self.subject.partition(":")[2]

    @property
    def reset_at(self) -> datetime | None:
        return None if self.window == LIFETIME else self.window.end

    def expire_at(self) -> int:
        """Epoch seconds after which the key may go: the window's end plus a margin."""
        if self.window == LIFETIME:
            return 0
        # Settles arriving after the key expired change nothing (their charge is in
        # the log), so the margin only spares in-flight requests a rebuild.
        length = self.window.end - self.window.start
        margin = max(timedelta(seconds=1), min(length, timedelta(days=1)))
        return math.ceil((self.window.end + margin).timestamp())


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _from_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def tag_subject(name: str) -> str:
    return f"tag:{name}"
