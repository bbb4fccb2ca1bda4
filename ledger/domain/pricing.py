"""Prices: genai-prices (a maintained, offline price database) plus operator overrides.

Looked up once per (provider, model) and cached. Flat per-token prices are
applied directly; tiered prices, per-request fees and prices that depend on the
time go through genai-prices' own calculation, the last resolved at each call.
All amounts are exact decimals.
"""

from __future__ import annotations

import difflib
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from genai_prices import Usage, calc_price
from genai_prices.data_snapshot import DataSnapshot, get_snapshot, set_custom_snapshot

from ledger.settings import PriceOverride

_MTOK = Decimal(1_000_000)


@dataclass(frozen=True, slots=True)
class Tokens:
    prompt: int = 0
    completion: int = 0
    cached: int = 0  # part of prompt read from the provider's cache


@dataclass(frozen=True, slots=True)
class Price:
    """Prices of one model. ``engine`` is genai-prices' ModelPrice when its own
    calculation is needed (tiered prices, per-request fees); ``info`` its
    ModelInfo when the price depends on the time (off-peak hours, a new price
    from a date), resolved at each calculation rather than once and cached."""

    model: str
    provider: str
    input_per_mtok: Decimal | None
    output_per_mtok: Decimal | None
    cached_input_per_mtok: Decimal | None
    engine: Any = None
    info: Any = None

    def cost(self, tokens: Tokens, at: datetime | None = None) -> Decimal:
        """What ``tokens`` cost, at the price in force at ``at`` (default now)."""
        if self.input_per_mtok is not None and self.output_per_mtok is not None:
            cached = min(tokens.cached, tokens.prompt)
            cached_rate = (
                self.cached_input_per_mtok if self.cached_input_per_mtok is not None else self.input_per_mtok
            )
            total = (
                (tokens.prompt - cached) * self.input_per_mtok
                + cached * cached_rate
                + tokens.completion * self.output_per_mtok
            )
            return total / _MTOK
        engine = self.engine if self.info is None else self.info.get_prices(at or datetime.now(UTC))
        return _engine_cost(engine, tokens)

    def upper_bound(self, tokens: Tokens) -> Decimal:
        """The most ``tokens`` (as prompt and completion caps) can cost at any time:
        the prompt all fresh or all read from cache (some models price cached input
        above fresh input), under every price the model has (time-dependent ones
        included). Costs grow with each token count, so the caps bound any usage
        within them."""
        fresh = Tokens(tokens.prompt, tokens.completion, 0)
        cached = Tokens(tokens.prompt, tokens.completion, tokens.prompt)
        if self.info is None:
            return max(self.cost(fresh), self.cost(cached))
        prices = self.info.prices
        engines = [c.prices for c in prices] if isinstance(prices, list) else [prices]
        return max(_engine_cost(e, t) for e in engines for t in (fresh, cached))


def _engine_cost(engine: Any, tokens: Tokens) -> Decimal:
    usage = Usage(
        input_tokens=tokens.prompt,
        output_tokens=tokens.completion,
        cache_read_tokens=min(tokens.cached, tokens.prompt) or None,
    )
    return Decimal(engine.calc_price(usage)["total_price"])


class PriceBook:
    """Prices by (provider, model), with overrides first, behind a bounded LRU
    cache of hits and misses (a miss costs as much to look up as a hit, and
    clients choose model names: the cache must not grow with them)."""

    def __init__(self, overrides: tuple[PriceOverride, ...] = (), *, cache_size: int = 4096) -> None:
        self._overrides = overrides
        self._cache: OrderedDict[tuple[str, str], Price | None] = OrderedDict()
        self._cache_size = cache_size
        self._database_lookups = 0

    def lookup(self, provider: str, model: str) -> Price | None:
        key = (provider, model)
        try:
            self._cache.move_to_end(key)
            return self._cache[key]
        except KeyError:
            pass
        price = self._override(provider, model) or self._from_database(provider, model)
        self._cache[key] = price
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return price

    def _from_database(self, provider: str, model: str) -> Price | None:
        self._database_lookups += 1
        if self._database_lookups % self._cache_size == 0:
            # genai-prices remembers every name it resolved: start it afresh now
            # and then, so that it stays bounded too.
            set_custom_snapshot(DataSnapshot(providers=get_snapshot().providers, from_auto_update=False))
        for ref_provider, ref_model in _candidates(provider, model):
            price = _from_database(ref_provider, ref_model)
            if price is not None:
                return price
        return None

    def similar(self, provider: str, model: str, limit: int = 5) -> list[str]:
        """Priced model names close to ``model`` (for an error that says which would do)."""
        names = [o.model for o in self._overrides]
        by_id = {p.id: p for p in get_snapshot().providers}
        for pid in dict.fromkeys([provider, "openai", "anthropic", "google"]):
            if pid in by_id:
                prefix = "" if pid == provider else f"{pid}/"
                names += [prefix + m.id for m in by_id[pid].models]
        return difflib.get_close_matches(model, names, n=limit, cutoff=0.5)

    def _override(self, provider: str, model: str) -> Price | None:
        for o in self._overrides:
            if o.model == model and o.provider in (None, provider):
                return Price(model, provider, o.input_per_mtok, o.output_per_mtok, o.cached_input_per_mtok)
        return None


# Prefixes aggregators use where genai-prices names the provider differently.
_PREFIX_ALIASES = {
    "mistralai": "mistral",
    "meta-llama": "meta",
    "xai": "x-ai",
    "moonshot": "moonshotai",
    "gemini": "google",
    "vertex_ai": "google",
    "bedrock": "aws",
}


def _candidates(provider: str, model: str) -> list[tuple[str | None, str]]:
    """Where to look a model up, best first: the upstream's own provider; for a
    ``provider/model`` id, that provider (as genai-prices names it), then any
    provider; an aggregator's catalogue of such ids; finally any provider."""
    out: list[tuple[str | None, str]] = [(provider, model)]
    prefix, slash, rest = model.partition("/")
    if slash and rest:
        out.append((_PREFIX_ALIASES.get(prefix.lower(), prefix.lower()), rest))
        out.append(("openrouter", model))
        out.append((None, rest))
    else:
        out.append((None, model))
    return list(dict.fromkeys(out))


def _flat(value: Any) -> Decimal | None:
    return value if isinstance(value, Decimal) else None


def _from_database(provider: str | None, model: str) -> Price | None:
    try:
        found = calc_price(Usage(input_tokens=0, output_tokens=0), model_ref=model, provider_id=provider)
    except LookupError:
        return None
    provider = found.provider.id
    if isinstance(found.model.prices, list) and len(found.model.prices) > 1:
        return Price(model, provider, None, None, None, info=found.model)
    mp = found.model_price
    inp, out, cached = _flat(mp.input_mtok), _flat(mp.output_mtok), _flat(mp.cache_read_mtok)
    tiered = (mp.input_mtok is not None and inp is None) or (mp.output_mtok is not None and out is None)
    # A per-request fee is the one component the usage we pass genai-prices can
    # charge beyond tokens: such prices go through its own calculation.
    fee = getattr(mp, "requests_kcount", None) is not None
    if tiered or fee or inp is None or out is None:
        return Price(model, provider, None, None, None, engine=mp)
    return Price(model, provider, inp, out, cached)
