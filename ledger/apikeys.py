"""Client API keys: generated once, stored only as a hash (as events), cached in memory.

A key is shown once, at generation. The log holds its SHA-256, a short
non-secret prefix for people to recognise it, the tags it always applies, the
models it may use, an alias and metadata, and LiteLLM's key settings: an owner
(``user_id``) and team label, a budget (``max_budget`` per ``budget_duration``),
rate limits, an expiry and a blocked flag. Every gateway process keeps the keys
in memory and refreshes them on NOTIFY, like the budget definitions.

Stream ``key:<hash>``: KeyGenerated (version 1), then KeyUpdated and
KeySpendReset, and KeyDeleted last. The request path enforces the budget and
limits; expiry and blocking are enforced here, in ``authenticate``.
"""

from __future__ import annotations

import asyncio
import calendar
import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import structlog
from msgspec import UNSET, UnsetType

from ledger import events as ev
from ledger.domain import limits
from ledger.domain.windows import LIFETIME, Window, parse_duration, window_at
from ledger.errors import ConcurrencyError, LedgerError
from ledger.events import RecordedEvent, tagged, to_new
from ledger.postgres.follow import FollowedCache
from ledger.postgres.store import EventStore
from ledger.tags import TagError, validate_name

log = structlog.get_logger(__name__)

KEY_PREFIX = "sk-ledger-"
MAX_KEY_TAGS = 64
MAX_KEY_METADATA = 8192
MIN_CUSTOM_KEY = 16
MAX_CUSTOM_KEY = 256


class KeyFields(msgspec.Struct, frozen=True, omit_defaults=True):
    """The editable settings of a key; UNSET means "not part of this change"."""

    key_alias: str | UnsetType | None = UNSET
    tags: list[str] | UnsetType = UNSET
    allowed_models: list[str] | UnsetType | None = UNSET
    metadata: dict[str, Any] | UnsetType = UNSET
    user_id: str | UnsetType | None = UNSET
    team_id: str | UnsetType | None = UNSET
    max_budget: Decimal | UnsetType | None = UNSET
    soft_budget: Decimal | UnsetType | None = UNSET
    budget_duration: str | UnsetType | None = UNSET
    tpm_limit: int | UnsetType | None = UNSET
    rpm_limit: int | UnsetType | None = UNSET
    max_parallel_requests: int | UnsetType | None = UNSET
    model_max_budget: dict[str, ev.ModelBudget] | UnsetType | None = UNSET
    budget_id: str | UnsetType | None = UNSET
    expires: datetime | UnsetType | None = UNSET  # None: never
    blocked: bool | UnsetType = UNSET
    allowed_tags: list[str] | UnsetType | None = UNSET  # None: any tag


class KeyGenerated(msgspec.Struct, frozen=True, tag=True):
    key_hash: str
    key_prefix: str  # first characters, safe to show
    at: datetime
    key_alias: str | None = None
    tags: list[str] = []
    allowed_models: list[str] | None = None
    metadata: dict[str, Any] = {}
    request_id: str | None = None
    key_name: str | None = None  # LiteLLM's abbreviation, "sk-...abcd"
    user_id: str | None = None
    team_id: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, ev.ModelBudget] | None = None
    budget_id: str | None = None
    expires: datetime | None = None
    blocked: bool = False
    # The tags requests with this key may carry, besides its own: names and
    # "prefix:*" patterns, "*" for any. Absent (keys made before scopes existed): any.
    allowed_tags: list[str] | None = None


class KeyUpdated(msgspec.Struct, frozen=True, tag=True):
    key_hash: str
    at: datetime
    changes: KeyFields
    previous: KeyFields
    request_id: str | None = None


class KeySpendReset(msgspec.Struct, frozen=True, tag=True):
    """LiteLLM's ``spend`` on /key/update; the same meaning as TagSpendReset: in
    the key's budget window containing ``at``, earlier charges stop counting
    and ``spend`` counts in their place."""

    key_hash: str
    at: datetime
    spend: Decimal = Decimal(0)
    request_id: str | None = None


class KeyDeleted(msgspec.Struct, frozen=True, tag=True):
    key_hash: str
    at: datetime
    request_id: str | None = None


KeyEvent = KeyGenerated | KeyUpdated | KeySpendReset | KeyDeleted
KEY_EVENT_TYPES = ("KeyGenerated", "KeyUpdated", "KeySpendReset", "KeyDeleted")
_decoder: msgspec.json.Decoder[KeyEvent] = msgspec.json.Decoder(KeyEvent)


class ApiKeyError(LedgerError):
    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class KeyNotFound(ApiKeyError):
    status = 404


class InvalidKey(ApiKeyError):
    status = 422


class KeyConflict(ApiKeyError):
    status = 409


MAX_SCOPE = 200


def default_scope(tags: list[str]) -> list[str]:
    """The scope of a key made without one: its own tags and the tags under them
    (the demo key, bound to ``demo``, may use ``demo`` and ``demo:*``)."""
    return [*tags, *(f"{t}:*" for t in tags)]


def _scope(scope: list[str] | None) -> list[str] | None:
    if scope is None:
        return None
    if len(scope) > MAX_SCOPE:
        raise InvalidKey(f"allowed_tags may list at most {MAX_SCOPE} entries", "allowed_tags")
    for entry in scope:
        name = entry[:-2] if entry.endswith(":*") else entry
        if entry == "*":
            continue
        try:
            validate_name(name, "allowed_tags")
        except TagError:
            raise InvalidKey(
                f"allowed_tags entries are tag names, 'prefix:*' patterns or '*'; got {entry!r}",
                "allowed_tags",
            ) from None
    return list(dict.fromkeys(scope))


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def as_key_hash(value: str) -> str:
    """A key given as itself or as its hash (64 hex digits): the hash."""
    if len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value
    return hash_key(value)


def abbreviate(secret: str) -> str:
    """LiteLLM's ``key_name``: enough to recognise a key, too little to use it."""
    return f"{secret[:3]}...{secret[-4:]}"


def expiry(now: datetime, duration: str, field: str = "duration") -> datetime:
    """``now`` plus a duration (Ns, Nm, Nh, Nd, Nw or Nmo; months are calendar months)."""
    try:
        d = parse_duration(duration, field)
    except ValueError as e:
        raise InvalidKey(str(e), field) from None
    if d.unit == "mo":
        index = now.year * 12 + now.month - 1 + d.count
        year, month = divmod(index, 12)
        day = min(now.day, calendar.monthrange(year, month + 1)[1])
        return now.replace(year=year, month=month + 1, day=day)
    seconds = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[d.unit]
    return now + timedelta(seconds=d.count * seconds)


def decode_event(recorded: RecordedEvent) -> KeyEvent:
    return _decoder.decode(tagged(recorded))


@dataclass(frozen=True, slots=True)
class ApiKey:
    key_hash: str
    key_prefix: str
    created_at: datetime
    key_alias: str | None = None
    tags: tuple[str, ...] = ()
    allowed_models: tuple[str, ...] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    version: int = 1
    key_name: str | None = None
    updated_at: datetime | None = None
    user_id: str | None = None
    team_id: str | None = None
    max_budget: Decimal | None = None
    soft_budget: Decimal | None = None
    budget_duration: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None
    model_max_budget: dict[str, ev.ModelBudget] | None = None
    budget_id: str | None = None
    expires: datetime | None = None
    blocked: bool = False
    # Budget windows of fixed durations count from here: creation or last duration change.
    anchor: datetime | None = None
    spend_reset_at: datetime | None = None
    spend_reset_to: Decimal | None = None
    allowed_tags: tuple[str, ...] | None = None  # None: any tag (see KeyGenerated)

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models

    def may_tag(self, tag: str) -> bool:
        """Whether a request with this key may carry ``tag`` (its own tags always may)."""
        scope = self.allowed_tags
        if scope is None or tag in self.tags or tag in scope or "*" in scope:
            return True
        return any(p.endswith(":*") and tag.startswith(p[:-1]) for p in scope)

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and now >= self.expires

    def window(self, now: datetime) -> Window:
        """The key's budget window containing ``now`` (one lifetime window without a duration)."""
        if not self.budget_duration:
            return LIFETIME
        return window_at(parse_duration(self.budget_duration), self.anchor or self.created_at, now)

    def apply(self, event: KeyEvent, version: int) -> ApiKey:
        if isinstance(event, KeyUpdated):
            updates = {
                f: getattr(event.changes, f)
                for f in KeyFields.__struct_fields__
                if getattr(event.changes, f) is not UNSET
            }
            if "tags" in updates:
                updates["tags"] = tuple(updates["tags"])
            if updates.get("allowed_models") is not None:
                updates["allowed_models"] = tuple(updates["allowed_models"])
            if updates.get("allowed_tags") is not None:
                updates["allowed_tags"] = tuple(updates["allowed_tags"])
            anchor = self.anchor
            if "budget_duration" in updates and updates["budget_duration"] != self.budget_duration:
                anchor = event.at
            return replace(self, version=version, updated_at=event.at, anchor=anchor, **updates)
        if isinstance(event, KeySpendReset):
            return replace(self, version=version, spend_reset_at=event.at, spend_reset_to=event.spend)
        return replace(self, version=version)


def from_generated(event: KeyGenerated) -> ApiKey:
    return ApiKey(
        key_hash=event.key_hash,
        key_prefix=event.key_prefix,
        created_at=event.at,
        key_alias=event.key_alias,
        tags=tuple(event.tags),
        allowed_models=tuple(event.allowed_models) if event.allowed_models is not None else None,
        metadata=dict(event.metadata),
        version=1,
        key_name=event.key_name,
        updated_at=event.at,
        user_id=event.user_id,
        team_id=event.team_id,
        max_budget=event.max_budget,
        soft_budget=event.soft_budget,
        budget_duration=event.budget_duration,
        tpm_limit=event.tpm_limit,
        rpm_limit=event.rpm_limit,
        max_parallel_requests=event.max_parallel_requests,
        model_max_budget=event.model_max_budget,
        budget_id=event.budget_id,
        expires=event.expires,
        blocked=event.blocked,
        anchor=event.at,
        allowed_tags=tuple(event.allowed_tags) if event.allowed_tags is not None else None,
    )


# ------------------------------------------------------------------ validation

_LIMITS = (
    ("tpm_limit", limits.MAX_TPM),
    ("rpm_limit", limits.MAX_RPM),
    ("max_parallel_requests", limits.MAX_PARALLEL),
)


def validate_fields(fields: KeyFields, current: ApiKey | None) -> KeyFields:
    """Check every field that is set; cross-check with the key it will produce."""
    changes: dict[str, Any] = {}
    try:
        for name in ("key_alias", "user_id", "team_id", "budget_id"):
            value = getattr(fields, name)
            if value is not UNSET:
                changes[name] = limits.label(value, name)
        for name, maximum in _LIMITS:
            value = getattr(fields, name)
            if value is not UNSET:
                changes[name] = limits.rate_limit(value, name, maximum)
        for name in ("max_budget", "soft_budget"):
            value = getattr(fields, name)
            if value is not UNSET:
                changes[name] = limits.money(value, name)
        if fields.budget_duration is not UNSET:
            changes["budget_duration"] = limits.duration(fields.budget_duration, "budget_duration")
        if fields.model_max_budget is not UNSET:
            changes["model_max_budget"] = limits.model_budgets(fields.model_max_budget, "model_max_budget")
    except limits.FieldError as e:
        raise InvalidKey(str(e), e.field) from None
    if fields.tags is not UNSET:
        if len(fields.tags) > MAX_KEY_TAGS:
            raise InvalidKey(f"tags may list at most {MAX_KEY_TAGS} tags", "tags")
        for tag in fields.tags:
            try:
                validate_name(tag, "tags")
            except TagError as e:
                raise InvalidKey(str(e), "tags") from None
            # a key's tags are charged on every request: a template or scope name
            # there would charge one tag that every customer's budget shares
            if tag == "*" or tag.endswith(":*"):
                raise InvalidKey(
                    f"tags are charged on every request, so {tag!r} cannot be one: a name ending "
                    "in ':*' is a budget template (or '*' a scope); list patterns in allowed_tags",
                    "tags",
                )
        changes["tags"] = list(dict.fromkeys(fields.tags))
    if fields.allowed_models is not UNSET:
        models = fields.allowed_models
        if models is not None:
            if len(models) > 200 or any(not m or len(m) > 256 or m != m.strip() for m in models):
                raise InvalidKey("models must list at most 200 model names of 1 to 256 characters", "models")
            models = sorted(set(models))
        changes["allowed_models"] = models
    if fields.metadata is not UNSET:
        if len(msgspec.json.encode(fields.metadata)) > MAX_KEY_METADATA:
            raise InvalidKey(f"metadata must encode to at most {MAX_KEY_METADATA} bytes", "metadata")
        changes["metadata"] = fields.metadata
    if fields.allowed_tags is not UNSET:
        changes["allowed_tags"] = _scope(fields.allowed_tags)
    if fields.expires is not UNSET:
        changes["expires"] = fields.expires
    if fields.blocked is not UNSET:
        changes["blocked"] = fields.blocked
    result = KeyFields(**changes)

    def after(name: str) -> Any:
        value = getattr(result, name)
        return value if value is not UNSET else (getattr(current, name) if current else None)

    max_budget, soft_budget = after("max_budget"), after("soft_budget")
    if max_budget is not None and soft_budget is not None and soft_budget > max_budget:
        raise InvalidKey(
            f"soft_budget ({soft_budget}) must not exceed max_budget ({max_budget})", "soft_budget"
        )
    if after("budget_duration") is not None and max_budget is None:
        raise InvalidKey("budget_duration needs a max_budget", "budget_duration")
    return result


def validate_secret(secret: str) -> str:
    """A caller-chosen key (LiteLLM's ``key`` on /key/generate, e.g. to keep old keys)."""
    if not MIN_CUSTOM_KEY <= len(secret) <= MAX_CUSTOM_KEY:
        raise InvalidKey(f"key must be {MIN_CUSTOM_KEY} to {MAX_CUSTOM_KEY} characters long", "key")
    if not secret.isascii() or not secret.isprintable() or " " in secret:
        raise InvalidKey("key must be printable ASCII without spaces", "key")
    return secret


# ------------------------------------------------------------------ the book


class KeyBook(FollowedCache):
    """Live API keys by hash, loaded from the log and kept fresh."""

    types = KEY_EVENT_TYPES

    def __init__(
        self,
        store: EventStore,
        *,
        poll_interval_s: float = 1.0,
        clock: Callable[[], datetime] | None = None,
        default_scope: str = "own",
    ) -> None:
        super().__init__(store, poll_interval_s=poll_interval_s)
        # "own": a key made without allowed_tags may use its own tags (and those
        # under them); "any": any tag, as LiteLLM's keys (LEDGER_KEY_SCOPE_DEFAULT)
        self.default_scope = default_scope
        self.keys: dict[str, ApiKey] = {}
        # Deleted keys, kept so that their past spend still has an owner and a team.
        self.retired: dict[str, ApiKey] = {}
        self.now = clock or (lambda: datetime.now(UTC))

    def apply(self, recorded: RecordedEvent) -> None:
        event = decode_event(recorded)
        if isinstance(event, KeyGenerated):
            self.keys[event.key_hash] = from_generated(event)
            return
        key = self.keys.get(event.key_hash)
        if key is None:
            return
        if isinstance(event, KeyDeleted):
            self.retired[event.key_hash] = self.keys.pop(event.key_hash)
        else:
            self.keys[event.key_hash] = key.apply(event, recorded.version)

    def authenticate(self, secret: str) -> ApiKey | None:
        """The key, if it exists, is not blocked and has not expired."""
        key = self.keys.get(hash_key(secret))
        if key is None or key.blocked or key.expired(self.now()):
            return None
        return key

    def find(self, key_or_hash: str) -> ApiKey | None:
        """By the secret itself, or by its hash (what /key/list shows)."""
        return self.keys.get(key_or_hash) or self.keys.get(hash_key(key_or_hash))

    def known(self, key_hash: str) -> ApiKey | None:
        """A live or deleted key by hash: who owned the spend it made."""
        return self.keys.get(key_hash) or self.retired.get(key_hash)

    async def lookup(self, key_or_hash: str) -> ApiKey:
        key = self.find(key_or_hash)
        if key is None:
            await self.refresh()
            key = self.find(key_or_hash)
        if key is None:
            raise KeyNotFound("no such key", "key")
        return key

    async def generate(
        self,
        *,
        key_alias: str | None = None,
        tags: list[str] | None = None,
        allowed_models: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
        secret: str | None = None,
        duration: str | None = None,
        settings: KeyFields | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key: (the secret, shown only now; its record).

        ``secret`` is a caller-chosen key (stored as its hash only); ``duration``
        sets the expiry; ``settings`` carries LiteLLM's other key settings."""
        now = self.now()
        overrides = {
            "key_alias": key_alias,
            "tags": tags,
            "allowed_models": allowed_models,
            "metadata": metadata,
        }
        given = msgspec.structs.replace(
            settings or KeyFields(), **{k: v for k, v in overrides.items() if v is not None}
        )
        checked = validate_fields(given, None)
        if secret is None:
            secret = KEY_PREFIX + secrets.token_urlsafe(32)
            prefix = secret[: len(KEY_PREFIX) + 4]
        else:
            secret = validate_secret(secret)
            prefix = abbreviate(secret)
        expires = expiry(now, duration) if duration is not None else _or(checked.expires, None)

        event = KeyGenerated(
            key_hash=hash_key(secret),
            key_prefix=prefix,
            at=now,
            key_alias=_or(checked.key_alias, None),
            tags=_or(checked.tags, []),
            allowed_models=_or(checked.allowed_models, None),
            metadata=_or(checked.metadata, {}),
            request_id=request_id,
            key_name=abbreviate(secret),
            user_id=_or(checked.user_id, None),
            team_id=_or(checked.team_id, None),
            max_budget=_or(checked.max_budget, None),
            soft_budget=_or(checked.soft_budget, None),
            budget_duration=_or(checked.budget_duration, None),
            tpm_limit=_or(checked.tpm_limit, None),
            rpm_limit=_or(checked.rpm_limit, None),
            max_parallel_requests=_or(checked.max_parallel_requests, None),
            model_max_budget=_or(checked.model_max_budget, None),
            budget_id=_or(checked.budget_id, None),
            expires=expires,
            blocked=_or(checked.blocked, False),
            # A key made without a scope may use its own tags and those under them.
            allowed_tags=_or(
                checked.allowed_tags,
                default_scope(_or(checked.tags, [])) if self.default_scope == "own" else ["*"],
            ),
        )
        try:
            await self.store.append(f"key:{event.key_hash}", 0, [to_new(event)])
        except ConcurrencyError:
            # Only a caller-chosen key can collide: it exists, or existed and was deleted.
            raise KeyConflict("this key exists or was used before; choose another", "key") from None
        await self.refresh()
        return secret, self.keys[event.key_hash]

    async def update(
        self,
        key_or_hash: str,
        fields: KeyFields,
        *,
        duration: str | None = None,
        spend: Decimal | None = None,
        request_id: str | None = None,
        attempts: int = 20,
    ) -> ApiKey:
        """Partial update, retried on fresh state when a concurrent change wins the race."""
        reset_to = limits.money(spend, "spend") if spend is not None else None
        for _ in range(attempts):
            key = await self.lookup(key_or_hash)
            now = self.now()
            if duration is not None:
                fields = msgspec.structs.replace(fields, expires=expiry(now, duration))
            checked = validate_fields(fields, key)
            set_fields = [f for f in KeyFields.__struct_fields__ if getattr(checked, f) is not UNSET]
            previous = KeyFields(**{f: _plain(getattr(key, f)) for f in set_fields})
            events: list[KeyEvent] = []
            if set_fields or reset_to is None:
                events.append(KeyUpdated(key.key_hash, now, checked, previous, request_id))
            if reset_to is not None:
                events.append(KeySpendReset(key.key_hash, now, reset_to, request_id))
            try:
                await self.store.append(f"key:{key.key_hash}", key.version, [to_new(e) for e in events])
            except ConcurrencyError:
                await asyncio.sleep(0)
                await self.refresh()
                continue
            await self.refresh()
            return self.keys[key.key_hash]
        raise KeyConflict("the key is being changed concurrently; retry", "key")

    async def delete(self, key_or_hash: str, *, request_id: str | None = None) -> ApiKey:
        key = await self.lookup(key_or_hash)
        stream = f"key:{key.key_hash}"
        try:
            await self.store.append(
                stream, key.version, [to_new(KeyDeleted(key.key_hash, self.now(), request_id))]
            )
        except ConcurrencyError:
            await self.refresh()
            if key.key_hash not in self.keys:
                raise KeyNotFound("no such key (already deleted)", "key") from None
            raise KeyConflict("the key changed while it was being deleted; retry", "key") from None
        await self.refresh()
        return key


def _or(value: Any, default: Any) -> Any:
    return default if value is UNSET else value


def _plain(value: Any) -> Any:
    """ApiKey keeps tuples; the events keep lists."""
    return list(value) if isinstance(value, tuple) else value
