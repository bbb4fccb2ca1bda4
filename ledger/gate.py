"""The gate: may this request go upstream, and with what reserved?

The use case behind every proxied call, with no HTTP in it. ``Gate.admit`` takes
a parsed request (``Ask``) and returns ``Passed`` (admitted: forward it, with the
output cap to inject, if any) or ``Blocked`` (a budget or a rate limit); a request
that may not be made at all raises ``Refused`` naming why. The gateway maps each
to a response; status codes are chosen in its error middleware only.

Policy decided here, in this order (each a refusal before anything is reserved):
the key's tag scope (nothing about a tag outside it is said), the key's models,
each tag's models, a blocked end user, an unpriced model (``LEDGER_UNPRICED_POLICY``),
a bound the estimate cannot trust. Then the estimate (an upper bound) is admitted
on every budget and rate limit in one Redis call (``ledger/admission.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from ledger.admission import Admission, Admitted, BudgetExceeded, RateLimited
from ledger.apikeys import ApiKey
from ledger.budgets import BudgetBook, budgets_at
from ledger.domain.estimate import Bound, BoundError, request_bound
from ledger.domain.pricing import Price, PriceBook, Tokens
from ledger.errors import LedgerError
from ledger.settings import Settings


class Refused(LedgerError):
    """A request that may not be made: ``reason`` says whether the request is wrong
    (``invalid``) or not allowed (``forbidden``); ``param`` names the field."""

    def __init__(
        self, message: str, *, reason: Literal["invalid", "forbidden"], param: str | None, code: str
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.param = param
        self.code = code


@dataclass(frozen=True, slots=True)
class Ask:
    """One parsed request, as the gate needs it."""

    request_id: str
    kind: str  # "chat" | "completions" | "embeddings" (ledger/domain/estimate.py)
    body: dict[str, Any]
    model: str  # as the client named it
    upstream_model: str  # as the upstream names it (routing is the gateway's)
    price_provider: str
    tags: Sequence[str]
    user_hash: str | None
    metadata: dict[str, Any]
    key: ApiKey | None


@dataclass(frozen=True, slots=True)
class Passed:
    """Admitted: the request may go upstream. ``inject`` is the output cap to
    forward (a budget applies and the client set none), else None."""

    admitted: Admitted
    price: Price | None
    bound: Bound
    inject: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class Blocked:
    """Not admitted: a budget or a rate limit has no room. ``capped_by_default``:
    the estimate assumed the default output cap (the client set none), which the
    refusal should say, since a smaller cap may fit."""

    outcome: BudgetExceeded | RateLimited
    capped_by_default: bool


class Gate:
    def __init__(self, settings: Settings, book: BudgetBook, prices: PriceBook, admission: Admission) -> None:
        self.settings = settings
        self.book = book
        self.prices = prices
        self.admission = admission

    @staticmethod
    def check_scope(key: ApiKey | None, tags: Sequence[str]) -> None:
        """A tag outside the key's scope is refused before anything is reserved, read
        or routed: nothing about that tag (its budget, its models) is said."""
        if key is None:
            return
        outside = [t for t in tags if not key.may_tag(t)]
        if outside:
            raise Refused(
                f"this API key may not use tag {outside[0]!r} "
                "(the key's allowed_tags set its scope; an admin can widen it)",
                reason="forbidden",
                param="tags",
                code="tag_not_allowed",
            )

    def check(self, ask: Ask) -> tuple[Price | None, Bound, Decimal]:
        """Every refusal, then the price, the bound and the estimate."""
        key = ask.key
        self.check_scope(key, ask.tags)
        if key is not None and not (key.may_use(ask.model) or key.may_use(ask.upstream_model)):
            raise Refused(
                f"this API key may not use model {ask.model!r}",
                reason="forbidden",
                param="model",
                code="model_not_allowed",
            )
        for tag in ask.tags:
            state = self.book.get(tag)
            if (
                state is not None
                and state.models
                and ask.model not in state.models
                and ask.upstream_model not in state.models
            ):
                raise Refused(
                    f"tag {tag!r} may not use model {ask.model!r} (allowed: {', '.join(state.models)})",
                    reason="forbidden",
                    param="model",
                    code="model_not_allowed_for_tag",
                )
        if self.book.definitions.blocked(ask.user_hash):
            raise Refused("this end user is blocked", reason="forbidden", param="user", code="user_blocked")
        price = self.prices.lookup(ask.price_provider, ask.upstream_model)
        if price is None and self._unpriced_refused(ask):
            similar = self.prices.similar(ask.price_provider, ask.upstream_model)
            hint = f"; priced names like it: {', '.join(similar)}" if similar else ""
            raise Refused(
                f"model {ask.model!r} has no known price, so budgets cannot be enforced on it{hint}; "
                "or add a price override (LEDGER_PRICE_OVERRIDES)",
                reason="invalid",
                param="model",
                code="unpriced_model",
            )
        s = self.settings
        try:
            bound = request_bound(
                ask.kind,
                ask.body,
                default_cap=s.default_max_tokens,
                image_tokens=s.image_token_bound,
                file_tokens=s.file_token_bound,
            )
        except BoundError as e:
            raise Refused(str(e), reason="invalid", param=e.field, code="invalid_value") from None
        estimate = (
            price.upper_bound(Tokens(bound.prompt, bound.completion)) if price is not None else Decimal(0)
        )
        return price, bound, estimate

    def _unpriced_refused(self, ask: Ask) -> bool:
        policy = self.settings.unpriced_policy
        if policy != "auto":
            return policy == "deny"
        specs = self.book.specs_for(
            ask.tags,
            key_hash=ask.key.key_hash if ask.key is not None else None,
            user_hash=ask.user_hash,
            model=ask.model,
            aliases=(ask.upstream_model,),
        )
        return bool(budgets_at(specs, datetime.now(UTC)))

    async def admit(self, ask: Ask) -> Passed | Blocked:
        """Refuse (raises ``Refused``), or reserve and record. Raises what
        ``Admission.admit`` raises (DuplicateRequest, CountersUnavailable,
        StoreUnavailable)."""
        price, bound, estimate = self.check(ask)
        outcome = await self.admission.admit(
            ask.request_id,
            ask.tags,
            estimate,
            model=ask.model,
            user_hash=ask.user_hash,
            metadata=ask.metadata,
            key_hash=ask.key.key_hash if ask.key is not None else None,
            tokens=bound.prompt,
            # `openai/gpt-4o` is gpt-4o upstream: a per-model budget under either name applies
            model_aliases=(ask.upstream_model,),
        )
        if not isinstance(outcome, Admitted):
            return Blocked(outcome, bound.inject is not None)
        # A budget applies and the client set no output cap: forward the one the
        # estimate assumed, so the upstream cannot produce more than was reserved.
        # (Decided on the admission's budgets: one created a moment ago counts.)
        inject = bound.inject if outcome.budgets else None
        return Passed(outcome, price, bound, inject)
