"""Every budget and rate limit in force, from the log: one place that knows which
definitions apply to a request and how each cuts time into windows.

Subjects name what a budget or a limit is attached to:

* ``tag:<name>`` — a tag, by its own definition, or else by the longest budget
  template that matches it (a definition named ``customer:*`` gives every tag
  ``customer:<x>`` a budget and limits of its own);
* ``key:<key hash>`` — a client API key;
* ``user:<user hash>`` — an end user (LiteLLM's customer);
* ``<subject>|model:<model>`` — a subject's budget for one model (LiteLLM's
  ``model_max_budget``).

A subject's *epoch* is the log position of the last event that changed how its
budget cuts time (created, deleted, duration changed, budget added or removed,
spend reset, template changed). Positions only grow, so the newest definition
always has the highest epoch, whichever stream it came from; counter keys carry
it, so a changed definition never reuses a counter built under another.

The gateway (``ledger/budgets.py``), the budget-window projection, the alert
worker and ``verify`` all read definitions through :class:`Definitions`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal

import msgspec

from ledger import events as ev
from ledger.apikeys import KEY_EVENT_TYPES, ApiKey, KeyDeleted, KeyGenerated, KeySpendReset
from ledger.apikeys import decode_event as decode_key_event
from ledger.apikeys import from_generated as key_from_generated
from ledger.counters import Budget
from ledger.customers import CustomerState
from ledger.domain.money import limit_to_nanos, to_nanos
from ledger.domain.windows import LIFETIME, Window, parse_duration, window_at
from ledger.events import RecordedEvent
from ledger.tags import TagState

TAG = "tag:"
KEY = "key:"
USER = "user:"
TEMPLATE_SUFFIX = ":*"

DEFINITION_TYPES = (*ev.TAG_EVENT_TYPES, *KEY_EVENT_TYPES, *ev.CUSTOMER_EVENT_TYPES)
_TAG_TYPES = frozenset(ev.TAG_EVENT_TYPES)
_KEY_TYPES = frozenset(KEY_EVENT_TYPES)

_customer_decoder: msgspec.json.Decoder[ev.CustomerEvent] = msgspec.json.Decoder(ev.CustomerEvent)


def is_template(name: str) -> bool:
    """A tag definition named ``prefix:*`` is a budget template."""
    return name.endswith(TEMPLATE_SUFFIX) and len(name) > len(TEMPLATE_SUFFIX)


def model_subject(subject: str, model: str) -> str:
    return f"{subject}|model:{model}"


def describe(subject: str) -> str:
    """A subject as a client reads it in an error (a key or a user by kind, not hash)."""
    base, _, model = subject.partition("|model:")
    if base.startswith(TAG):
        text = f"tag {base[len(TAG) :]!r}"
    elif base.startswith(KEY):
        text = "this API key"
    elif base.startswith(USER):
        text = "this end user"
    else:
        text = base
    return f"{text}, model {model!r}" if model else text


@dataclass(frozen=True, slots=True)
class Limits:
    """Rate limits of one subject (LiteLLM's rpm_limit, tpm_limit, max_parallel_requests)."""

    rpm: int | None = None
    tpm: int | None = None
    parallel: int | None = None

    def __bool__(self) -> bool:
        return self.rpm is not None or self.tpm is not None or self.parallel is not None


@dataclass(frozen=True, slots=True)
class Spec:
    """What is in force for one subject: its budget (if any), windows and limits."""

    subject: str
    label: str  # for messages: "tag 'team:a'", "API key 'bot'", "end user", ...
    epoch: int
    max_budget: Decimal | None = None
    duration: str | None = None
    anchor: datetime | None = None
    limits: Limits = field(default_factory=Limits)
    source: str | None = None  # the template a tag's budget comes from, if any
    reset_at: datetime | None = None  # spend reset: in its window, earlier charges do not count
    reset_to: Decimal = Decimal(0)  # and this counts instead

    @property
    def has_budget(self) -> bool:
        return self.max_budget is not None

    def window(self, now: datetime) -> Window:
        if not self.duration:
            return LIFETIME
        assert self.anchor is not None
        return window_at(parse_duration(self.duration), self.anchor, now)

    def budget(self, now: datetime) -> Budget | None:
        """The budget in force at ``now`` (None without one)."""
        if self.max_budget is None:
            return None
        window = self.window(now)
        since, base = None, 0
        if self.reset_at is not None and self.reset_at in window and self.reset_at > window.start:
            since, base = self.reset_at, to_nanos(self.reset_to)
        return Budget(self.subject, self.epoch, window, limit_to_nanos(self.max_budget), since, base)


@dataclass(slots=True)
class _Source:
    """One definition as the log built it, and the position its windows date from."""

    epoch: int = 0  # last change of windowing (see module docstring)
    model_epoch: int = 0  # last change of its per-model budgets, or of its windowing
    changed_at: datetime | None = None  # when that change was made


@dataclass(slots=True)
class Definitions:
    """Tag, key and end-user definitions, applied event by event in log order."""

    tags: dict[str, TagState] = field(default_factory=dict)
    keys: dict[str, ApiKey] = field(default_factory=dict)
    users: dict[str, CustomerState] = field(default_factory=dict)
    _sources: dict[str, _Source] = field(default_factory=dict)  # by subject of the definition
    _templates: list[str] = field(default_factory=list)  # template names, longest first

    # ------------------------------------------------------------------ applying

    def apply(self, r: RecordedEvent) -> str | None:
        """Apply one definition event; return the subject whose windows it changed
        (a template's own subject for a template), or None."""
        if r.type in _TAG_TYPES:
            return self._tag(r)
        if r.type in _KEY_TYPES:
            return self._key(r)
        return self._user(r)

    def _moved(self, subject: str, r: RecordedEvent, windows: bool, models: bool) -> str | None:
        source = self._sources.setdefault(subject, _Source())
        if windows:
            source.epoch = source.model_epoch = r.position
        elif models:
            source.model_epoch = r.position
        if windows or models:
            source.changed_at = _event_time(r)
        return subject if windows or models else None

    def changed_at(self, subject: str) -> datetime | None:
        """When the definition in force for ``subject`` last changed its windows."""
        spec = self.spec(subject)
        if spec is None:
            return None
        definer = TAG + spec.source if spec.source else subject.split("|model:", 1)[0]
        times = [
            self._sources.get(d, _Source()).changed_at for d in (definer, subject.split("|model:", 1)[0])
        ]
        known = [t for t in times if t is not None]
        return max(known) if known else None

    def _tag(self, r: RecordedEvent) -> str | None:
        event = ev.decode_tag(r)
        before = self.tags.get(event.name) or TagState(name=event.name, version=0)
        after = before.apply(event, r.version)
        self.tags[event.name] = after
        if is_template(event.name):
            self._templates = sorted(
                (n for n, s in self.tags.items() if s.exists and is_template(n)), key=len, reverse=True
            )
        windows = _windowing(before, after) or isinstance(event, ev.TagSpendReset)
        models = before.model_max_budget != after.model_max_budget
        return self._moved(TAG + event.name, r, windows, models)

    def _key(self, r: RecordedEvent) -> str | None:
        event = decode_key_event(r)
        before = self.keys.get(event.key_hash)
        if isinstance(event, KeyGenerated):
            after: ApiKey | None = key_from_generated(event)
        elif isinstance(event, KeyDeleted) or before is None:
            after = None
        else:
            after = before.apply(event, r.version)
        if after is None:
            self.keys.pop(event.key_hash, None)
        else:
            self.keys[event.key_hash] = after
        windows = (
            before is None
            or after is None
            or isinstance(event, KeySpendReset)
            or before.budget_duration != after.budget_duration
            or (before.max_budget is None) != (after.max_budget is None)
        )
        models = after is not None and (before is None or before.model_max_budget != after.model_max_budget)
        return self._moved(KEY + event.key_hash, r, windows, models)

    def _user(self, r: RecordedEvent) -> str | None:
        event = _customer_decoder.decode(ev.tagged(r))
        before = self.users.get(event.user_hash) or CustomerState(user_hash=event.user_hash, version=0)
        after = before.apply(event, r.version)
        self.users[event.user_hash] = after
        windows = (
            before.exists != after.exists
            or before.budget_duration != after.budget_duration
            or (before.max_budget is None) != (after.max_budget is None)
        )
        models = before.model_max_budget != after.model_max_budget
        return self._moved(USER + event.user_hash, r, windows, models)

    # ------------------------------------------------------------------ reading

    def template_of(self, name: str) -> TagState | None:
        """The longest live template that matches ``name`` (not a template itself)."""
        if is_template(name):
            return None
        for template in self._templates:
            if name.startswith(template[:-1]):
                return self.tags[template]
        return None

    def tag(self, name: str) -> Spec | None:
        """What is in force for a tag: its own definition, else its template's."""
        own = self.tags.get(name)
        src = self._sources.get(TAG + name, _Source())
        # a definition with per-model budgets only is in force too (its models')
        if (
            own is not None
            and own.exists
            and (own.max_budget is not None or _limits(own) or own.model_max_budget)
        ):
            return _spec(TAG + name, f"tag {name!r}", src.epoch, own, own.anchor, None)
        template = self.template_of(name)
        if template is None:
            return None
        tsrc = self._sources.get(TAG + template.name, _Source())
        # Newer of the two: the template's change, or this tag's own (say, its
        # explicit budget deleted): positions only grow.
        epoch = max(tsrc.epoch, src.epoch)
        return _spec(TAG + name, f"tag {name!r}", epoch, template, template.anchor, template.name)

    def key(self, key_hash: str) -> Spec | None:
        key = self.keys.get(key_hash)
        if key is None:
            return None
        src = self._sources.get(KEY + key_hash, _Source())
        label = f"API key {key.key_alias!r}" if key.key_alias else f"API key {key.key_prefix}…"
        spec = _spec(KEY + key_hash, label, src.epoch, key, key.anchor or key.created_at, None)
        return spec if spec.has_budget or spec.limits or key.model_max_budget else None

    def user(self, user_hash: str) -> Spec | None:
        user = self.users.get(user_hash)
        if user is None or not user.exists:
            return None
        src = self._sources.get(USER + user_hash, _Source())
        spec = _spec(USER + user_hash, "end user", src.epoch, user, user.anchor, None)
        return spec if spec.has_budget or spec.limits or user.model_max_budget else None

    def blocked(self, user_hash: str | None) -> bool:
        user = self.users.get(user_hash) if user_hash else None
        return user is not None and user.exists and user.blocked

    def specs_for(
        self,
        tags: list[str] | tuple[str, ...],
        key_hash: str | None = None,
        user_hash: str | None = None,
        model: str | None = None,
        aliases: Sequence[str] = (),
    ) -> list[Spec]:
        """Every budget and limit a request with these attributes answers to.
        ``aliases``: other names of the model (the upstream's, for a request that
        said ``openai/gpt-4o``): a per-model budget under any of them applies."""
        out: list[Spec] = []
        owners: list[tuple[Spec, TagState | ApiKey | CustomerState]] = []
        for name in dict.fromkeys(tags):
            spec = self.tag(name)
            if spec is not None:
                out.append(spec)
                owners.append((spec, self.tags[spec.source] if spec.source else self.tags[name]))
        if key_hash is not None and (spec := self.key(key_hash)) is not None:
            out.append(spec)
            owners.append((spec, self.keys[key_hash]))
        if user_hash is not None and (spec := self.user(user_hash)) is not None:
            out.append(spec)
            owners.append((spec, self.users[user_hash]))
        if model is not None:
            names = list(dict.fromkeys([model, *aliases]))
            for parent, owner in owners:
                for name in names:
                    per_model = (owner.model_max_budget or {}).get(name)
                    if per_model is not None:
                        out.append(self._model_spec(parent, owner, name, per_model))
        return out

    def _model_spec(
        self, parent: Spec, owner: TagState | ApiKey | CustomerState, model: str, mb: ev.ModelBudget
    ) -> Spec:
        # the definition that holds the per-model budgets: the template, or the subject's own
        definer = TAG + parent.source if parent.source else parent.subject
        src = self._sources.get(definer, _Source())
        return Spec(
            subject=model_subject(parent.subject, model),
            label=f"{parent.label}, model {model!r}",
            epoch=max(src.model_epoch, parent.epoch),
            max_budget=mb.max_budget,
            duration=mb.budget_duration,
            anchor=parent.anchor or getattr(owner, "anchor", None),
            limits=Limits(mb.rpm_limit, mb.tpm_limit, None),
        )

    def spec(self, subject: str) -> Spec | None:
        """The spec of any subject by its name (model subjects included)."""
        base, _, model = subject.partition("|model:")
        if base.startswith(TAG):
            parent = self.tag(base[len(TAG) :])
        elif base.startswith(KEY):
            parent = self.key(base[len(KEY) :])
        elif base.startswith(USER):
            parent = self.user(base[len(USER) :])
        else:
            return None
        if not model or parent is None:
            return parent
        owner: TagState | ApiKey | CustomerState
        if base.startswith(TAG):
            owner = self.tags[parent.source or base[len(TAG) :]]
        elif base.startswith(KEY):
            owner = self.keys[base[len(KEY) :]]
        else:
            owner = self.users[base[len(USER) :]]
        mb = (owner.model_max_budget or {}).get(model)
        return self._model_spec(parent, owner, model, mb) if mb is not None else None

    def budgeted(self) -> list[Spec]:
        """Every spec with a budget that exists as a definition (not template instances,
        which exist only as tags are met)."""
        out = [s for n in self.tags if not is_template(n) and (s := self.tag(n)) is not None]
        out += [s for h in self.keys if (s := self.key(h)) is not None]
        out += [s for h in self.users if (s := self.user(h)) is not None]
        return [s for s in out if s.has_budget]


def _event_time(r: RecordedEvent) -> datetime:
    """A definition event's own time (its ``at``), else when it was recorded."""
    at = msgspec.json.decode(r.data).get("at")
    return datetime.fromisoformat(at) if isinstance(at, str) else r.recorded_at


def _windowing(before: TagState, after: TagState) -> bool:
    return (
        before.exists != after.exists
        or before.budget_duration != after.budget_duration
        or (before.max_budget is None) != (after.max_budget is None)
        or before.version == 0
    )


def _limits(d: TagState | ApiKey | CustomerState) -> Limits:
    return Limits(d.rpm_limit, d.tpm_limit, d.max_parallel_requests)


def _spec(
    subject: str,
    label: str,
    epoch: int,
    d: TagState | ApiKey | CustomerState,
    anchor: datetime | None,
    source: str | None,
) -> Spec:
    reset_at = getattr(d, "spend_reset_at", None) if source is None else None
    reset_to = getattr(d, "spend_reset_to", None) if source is None else None
    return Spec(
        subject=subject,
        label=label,
        epoch=epoch,
        max_budget=d.max_budget,
        duration=d.budget_duration,
        anchor=anchor,
        limits=_limits(d),
        source=source,
        reset_at=reset_at,
        reset_to=reset_to or Decimal(0),
    )


def with_epoch(spec: Spec, epoch: int) -> Spec:
    return replace(spec, epoch=epoch)
