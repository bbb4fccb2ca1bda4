"""Validation shared by tags, API keys and end users: LiteLLM's rate limits,
per-model budgets and free-text labels.

Every check names the field it refuses, so the admin API can answer a 422
that says what to fix.
"""

from __future__ import annotations

import unicodedata
from decimal import Decimal

from ledger import events as ev
from ledger.domain.money import MoneyError, parse_usd
from ledger.domain.windows import DurationError, parse_duration
from ledger.errors import LedgerError

MAX_TPM = 10**12
MAX_RPM = 10**9
MAX_PARALLEL = 10**6
MAX_MODEL_BUDGETS = 200
MAX_MODEL_NAME = 256
MAX_LABEL = 256
# Unicode categories a label may not contain: controls, format characters,
# surrogates, private use, unassigned code points, line and paragraph separators.
_UNPRINTABLE = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


class FieldError(LedgerError):
    """A value that breaks a rule; ``field`` names it."""

    status = 422

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


def rate_limit(value: int | None, field: str, maximum: int) -> int | None:
    """A positive whole number up to ``maximum``, or None for "no limit"."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise FieldError(f"{field} must be a whole number from 1 to {maximum} (null for no limit)", field)
    return value


def label(value: str | None, field: str, maximum: int = MAX_LABEL) -> str | None:
    """A printable string of 1 to ``maximum`` characters, or None."""
    if value is None:
        return None
    if not 1 <= len(value) <= maximum:
        raise FieldError(f"{field} must be 1 to {maximum} characters long", field)
    for ch in value:
        if unicodedata.category(ch) in _UNPRINTABLE:
            raise FieldError(f"{field} must be printable: U+{ord(ch):04X} is not allowed", field)
    return value


def money(value: Decimal | None, field: str) -> Decimal | None:
    if value is None:
        return None
    try:
        return parse_usd(value, field)
    except MoneyError as e:
        raise FieldError(str(e), field) from None


def duration(value: str | None, field: str) -> str | None:
    if value is None:
        return None
    try:
        parse_duration(value, field)
    except DurationError as e:
        raise FieldError(str(e), field) from None
    return value


def model_budgets(value: dict[str, ev.ModelBudget] | None, field: str) -> dict[str, ev.ModelBudget] | None:
    """LiteLLM's ``model_max_budget``: per model, a budget and/or limits."""
    if value is None:
        return None
    if len(value) > MAX_MODEL_BUDGETS:
        raise FieldError(f"{field} may list at most {MAX_MODEL_BUDGETS} models", field)
    out: dict[str, ev.ModelBudget] = {}
    for model, budget in sorted(value.items()):
        where = f"{field}.{model}" if len(model) <= MAX_MODEL_NAME else field
        if not 1 <= len(model) <= MAX_MODEL_NAME or model != model.strip():
            raise FieldError(f"{field} contains an invalid model name {model[:80]!r}", field)
        max_budget = money(budget.max_budget, f"{where}.max_budget")
        budget_duration = duration(budget.budget_duration, f"{where}.budget_duration")
        if budget_duration is not None and max_budget is None:
            raise FieldError(f"{where}.budget_duration needs a max_budget", where)
        entry = ev.ModelBudget(
            max_budget=max_budget,
            budget_duration=budget_duration,
            tpm_limit=rate_limit(budget.tpm_limit, f"{where}.tpm_limit", MAX_TPM),
            rpm_limit=rate_limit(budget.rpm_limit, f"{where}.rpm_limit", MAX_RPM),
        )
        if entry == ev.ModelBudget():
            raise FieldError(f"{where} needs a max_budget, tpm_limit or rpm_limit", where)
        out[model] = entry
    return out
