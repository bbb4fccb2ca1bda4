"""Rate limits (LiteLLM's ``rpm_limit``, ``tpm_limit``, ``max_parallel_requests``),
checked in the reserve script's round trip, with the budgets: a request is
admitted by every budget and every limit, or by none.

* ``rpm`` — requests admitted in the current minute (fixed minutes by the
  admitting gateway's clock): ``ledger:{<subject>}:rpm:<minute>``.
* ``tpm`` — tokens in the current minute, LiteLLM's way: a request is admitted
  while the minute's count is below the limit. It counts its prompt's bound when
  admitted; when it ends, the bound is taken back from the minute it was
  admitted in and its actual total counts in the minute it ended in.
* ``parallel`` — requests in flight: ``ledger:{<subject>}:par``, a sorted set of
  ``<request id>|<nonce>`` by deadline, so the slots of a gateway that died free
  themselves at the reservation deadline.

Minute keys expire two minutes after they start. Limits are not rebuilt from the
log: after a Redis loss they start again from zero, which only ever lets
through what one minute (or one request per slot) would have.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from ledger.counters.keys import PREFIX

Kind = Literal["rpm", "tpm", "parallel"]
MINUTE_MS = 60_000
SETTING: dict[Kind, str] = {"rpm": "rpm_limit", "tpm": "tpm_limit", "parallel": "max_parallel_requests"}
UNIT: dict[Kind, str] = {
    "rpm": "requests per minute",
    "tpm": "tokens per minute",
    "parallel": "requests at once",
}


@dataclass(frozen=True, slots=True)
class Limit:
    subject: str
    kind: Kind
    maximum: int

    def key(self, minute: int) -> str:
        if self.kind == "parallel":
            return f"{PREFIX}{{{self.subject}}}:par"
        return f"{PREFIX}{{{self.subject}}}:{self.kind}:{minute}"


def limits_of(subject: str, rpm: int | None, tpm: int | None, parallel: int | None) -> list[Limit]:
    out = []
    if rpm is not None:
        out.append(Limit(subject, "rpm", rpm))
    if tpm is not None:
        out.append(Limit(subject, "tpm", tpm))
    if parallel is not None:
        out.append(Limit(subject, "parallel", parallel))
    return out


def minute_of(moment: datetime) -> int:
    """The minute (ms since the epoch at its start) that holds ``moment``."""
    ms = int(moment.timestamp() * 1000)
    return ms - ms % MINUTE_MS


@dataclass(frozen=True, slots=True)
class Limited:
    """Refused by a rate limit: which, how much of it is used, and when to retry."""

    limit: Limit
    used: int
    retry_after_s: int


def retry_after(limit: Limit, now: datetime) -> int:
    """Seconds until the limit can admit again: the minute's end for rpm and tpm
    (whole seconds, rounded up); a slot's end is unknown, so 1 for parallel."""
    if limit.kind == "parallel":
        return 1
    ms = int(now.timestamp() * 1000)
    return max(1, math.ceil((minute_of(now) + MINUTE_MS - ms) / 1000))


@dataclass(frozen=True, slots=True)
class Holding:
    """What an admitted request holds of its limits, given back when it ends."""

    limits: tuple[Limit, ...]
    minute: int  # the admission's minute
    tokens: int  # the prompt bound counted against tpm at admission
    member: str  # its entry in the parallel sets: "<request id>|<nonce>"
