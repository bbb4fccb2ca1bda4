"""Settings: one frozen object built from the environment and an optional TOML file.

Precedence: explicit overrides (CLI flags) > ``LEDGER_*`` environment variables >
the TOML file named by ``LEDGER_CONFIG`` > defaults. Every field has a safe
default. The field types are the whole specification of a value (``Annotated``
bounds and patterns, ``Literal`` modes, checks in ``__post_init__``): the values
of all three sources are merged and checked by one ``msgspec.convert``, and its
error becomes a :class:`SettingsError` naming the variable, flag or file key the
bad value came from, with what it must be.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import msgspec
import msgspec.inspect as mi
from msgspec import Meta

from ledger.errors import SettingsError

ENV_PREFIX = "LEDGER_"

LogFormat = Literal["json", "console"]
LogLevel = Literal["debug", "info", "warning", "error"]
CommitMode = Literal["durable", "fast"]
RedisDownPolicy = Literal["deny", "allow"]
KeyScope = Literal["own", "any"]
UnpricedPolicy = Literal["auto", "deny", "allow"]
WebhookFormat = Literal["json", "slack"]

# msgspec.inspect reports a Literal's values in no set order; errors list them as declared.
_MODE_ORDER = {
    frozenset(get_args(mode)): get_args(mode)
    for mode in (LogFormat, LogLevel, CommitMode, RedisDownPolicy, KeyScope, UnpricedPolicy, WebhookFormat)
}

LOG_FORMATS: tuple[str, ...] = get_args(LogFormat)
LOG_LEVELS: tuple[str, ...] = get_args(LogLevel)

# The description is what an error says the value must be.
Name = Annotated[
    str,
    Meta(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$", description="a lower-case name like 'openai'"),
]
EnvName = Annotated[
    str, Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="the name of an environment variable")
]
NonEmpty = Annotated[str, Meta(min_length=1)]
Host = Annotated[str, Meta(pattern=r"^\S+$", description="a host name or address")]


class ProviderConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An upstream: OpenAI-compatible API at ``base_url``."""

    name: Name
    base_url: str
    api_key_env: EnvName | None = None  # the key is read from this environment variable
    models: tuple[NonEmpty, ...] = ()  # bare model names this provider serves ("" = any)
    price_provider: str | None = None  # genai-prices provider id (default: name)

    def __post_init__(self) -> None:
        if not _is_url(self.base_url, ("http", "https")):
            raise ValueError("base_url must be an http(s) URL")
        msgspec.structs.force_setattr(self, "base_url", self.base_url.rstrip("/"))


class PriceOverride(msgspec.Struct, frozen=True):
    """Operator price for a model, USD per million tokens (beats genai-prices)."""

    model: NonEmpty
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    provider: str | None = None  # None: any provider

    def __post_init__(self) -> None:
        # Decimal takes no Meta bounds; NaN must not reach a comparison.
        for name in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok"):
            price = getattr(self, name)
            if price is not None and not (price.is_finite() and price >= 0):
                raise ValueError(f"{name} must be a finite number >= 0")


class WebhookConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where budget alerts go: every alert, or those of some tags."""

    name: Name
    url: str
    tags: tuple[NonEmpty, ...] = ()  # empty: every tag
    format: WebhookFormat = "json"
    max_attempts: Annotated[int, Meta(ge=1, le=50)] = 5
    timeout_s: Annotated[float, Meta(ge=0.1, le=120)] = 5.0

    def __post_init__(self) -> None:
        if not _is_url(self.url, ("http", "https")):
            raise ValueError("url must be an http(s) URL")


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    # Servers. None means "not configured": `ledger dev` then starts embedded ones.
    database_url: str | None = None
    # A streaming replica for spend reports and the dashboard's reads (None: the
    # primary); the request path, admin writes and projections stay on the primary.
    database_read_url: str | None = None
    redis_url: str | None = None
    # LEDGER_REDIS_URL names one node of a Redis Cluster (any: the client learns the
    # rest): budget scripts then run subject by subject, each in its own hash slot.
    redis_cluster: bool = False

    # HTTP
    host: Host = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 4000
    admin_key: Annotated[str, Meta(min_length=16)] | None = None
    data_dir: Path = Path(".data")

    # Logging
    log_format: LogFormat = "json"
    log_level: LogLevel = "info"

    # PostgreSQL pool and event writer (group commit)
    pool_min_size: Annotated[int, Meta(ge=1, le=1000)] = 2
    pool_max_size: Annotated[int, Meta(ge=1, le=1000)] = 10
    connect_timeout_s: Annotated[float, Meta(ge=0.1, le=300)] = 3.0
    statement_timeout_s: Annotated[float, Meta(ge=0.1, le=3600)] = 10.0
    writer_max_batch: Annotated[int, Meta(ge=1, le=100_000)] = 2000
    writer_max_wait_ms: Annotated[float, Meta(ge=0, le=1000)] = 2.0
    writer_queue_size: Annotated[int, Meta(ge=1, le=10_000_000)] = 20000
    append_timeout_s: Annotated[float, Meta(ge=0.1, le=600)] = 5.0
    poll_interval_s: Annotated[float, Meta(ge=0.01, le=3600)] = 1.0
    redis_max_connections: Annotated[int, Meta(ge=1, le=10_000)] = 64
    # Projection workers in every gateway process (one active per projection,
    # the others standing by); set false to run `ledger projections run` apart.
    run_projections: bool = True
    # "durable": an append is acknowledged once its commit is on disk (fsync).
    # "fast": once PostgreSQL has it in memory (synchronous_commit=off): a crash
    # of the database host may lose the last few hundred ms of events, which the
    # sweeper then charges at their estimates; a gateway crash loses nothing.
    commit_mode: CommitMode = "durable"
    # HTTP worker processes of `ledger serve`, sharing the port (SO_REUSEPORT);
    # projection and alert workers run in the first one only.
    workers: Annotated[int, Meta(ge=1, le=64)] = 1
    # Redis down: "deny" answers 503 (budgets cannot be checked); "allow" admits
    # and records, then rebuilds the counters from the log once Redis is back.
    on_redis_down: RedisDownPolicy = "deny"
    # The tags a client key made without allowed_tags may carry: "own" (its own tags
    # and those under them) or "any" (LiteLLM's behaviour: any tag, any budget).
    key_scope_default: KeyScope = "own"

    # Budgets: an admitted request not settled within the reservation TTL is
    # swept (charged at its estimate); the sweeper looks every sweep interval.
    # It must outlast the longest request (the upstream total timeout) and the
    # two commits around it, or a request still running could be swept.
    reservation_ttl_s: Annotated[float, Meta(ge=1, le=7 * 86400)] = 900.0
    sweep_interval_s: Annotated[float, Meta(ge=0.05, le=3600)] = 5.0

    # The event log's months archived by `ledger archive --to DIR`: `replay` and
    # `verify` read them merged with the live partitions (their --archive wins).
    archive_dir: Path | None = None

    # Gateway: upstream providers and request handling
    providers: tuple[ProviderConfig, ...] = ()
    default_provider: str | None = None
    upstream_connect_timeout_s: Annotated[float, Meta(ge=0.1, le=600)] = 5.0
    upstream_first_byte_timeout_s: Annotated[float, Meta(ge=0.1, le=3600)] = 120.0
    upstream_total_timeout_s: Annotated[float, Meta(ge=0.1, le=86400)] = 600.0
    max_body_bytes: Annotated[int, Meta(ge=1024, le=1024**3)] = 8 * 1024 * 1024
    # Admin API bodies (tags, keys, customers) are small JSON objects.
    max_admin_body_bytes: Annotated[int, Meta(ge=1024, le=16 * 1024**2)] = 64 * 1024
    # Slow clients: a connection must deliver a whole request head within
    # client_header_timeout_s of opening or of its previous response (so idle
    # keep-alive connections close too; longer than a reverse proxy's own idle
    # timeout, nginx's is 60 s, or it may reuse one just closed), and a request
    # body within client_body_timeout_s of the head; else it is closed (408).
    client_header_timeout_s: Annotated[float, Meta(ge=0.05, le=3600)] = 75.0
    client_body_timeout_s: Annotated[float, Meta(ge=0.05, le=3600)] = 60.0
    max_response_bytes: Annotated[int, Meta(ge=1024, le=1024**3)] = 64 * 1024 * 1024
    # Attribution limits
    max_tags: Annotated[int, Meta(ge=1, le=10_000)] = 64
    max_tag_length: Annotated[int, Meta(ge=1, le=10_000)] = 256
    max_metadata_bytes: Annotated[int, Meta(ge=64, le=1024**2)] = 16 * 1024
    # End-user ids are stored as HMAC-SHA256 with this secret (>= 32 chars), or
    # with the contents of user_hash_secret_file (a mounted secret), so that a
    # database dump alone cannot confirm a guessed e-mail. Unset: a secret
    # generated once and kept in the database (`ledger serve` warns).
    user_hash_secret: Annotated[str, Meta(min_length=32)] | None = None
    user_hash_secret_file: Path | None = None
    # Pricing: "auto" denies unpriced models only for requests with a budgeted
    # tag; "deny" always; "allow" records cost 0 flagged as unpriced.
    unpriced_policy: UnpricedPolicy = "auto"
    # output bound for estimates when the request sets none
    default_max_tokens: Annotated[int, Meta(ge=1, le=10_000_000)] = 4096
    image_token_bound: Annotated[int, Meta(ge=1, le=1_000_000)] = 2000  # input bound per image part
    # input bound per file sent by id (no size known)
    file_token_bound: Annotated[int, Meta(ge=1, le=10_000_000)] = 200_000
    price_overrides: tuple[PriceOverride, ...] = ()

    # Alerts: webhooks, and the key their bodies are signed with (X-Ledger-Signature).
    # Unset secret: one generated once and kept in the database.
    webhooks: tuple[WebhookConfig, ...] = ()
    webhook_secret: Annotated[str, Meta(min_length=16)] | None = None

    config_file: Path | None = None

    def __post_init__(self) -> None:
        """Checks no type can say. A ValueError names its field first (from_env
        puts the variable's name there); a cross-field SettingsError names both."""
        for name, schemes, what in _URL_FIELDS:
            value = getattr(self, name)
            if value is not None and not _is_url(value, schemes, query_ok=True):
                raise ValueError(f"{name} is not a valid {what} URL")
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise ValueError("providers names a provider twice")
        if len({w.name for w in self.webhooks}) != len(self.webhooks):
            raise ValueError("webhooks names a webhook twice")
        if self.default_provider is not None and self.default_provider not in names:
            raise SettingsError(
                f"{ENV_PREFIX}DEFAULT_PROVIDER {self.default_provider!r} is not one of the "
                f"configured providers ({', '.join(names) or 'none'})"
            )
        margin = 2 * self.append_timeout_s
        if self.reservation_ttl_s < self.upstream_total_timeout_s + margin:
            raise SettingsError(
                f"{ENV_PREFIX}RESERVATION_TTL_S ({self.reservation_ttl_s:g}) must exceed "
                f"{ENV_PREFIX}UPSTREAM_TOTAL_TIMEOUT_S ({self.upstream_total_timeout_s:g}) by at least "
                f"{margin:g} s (two append timeouts), or a request still running could be swept"
            )
        if self.pool_min_size > self.pool_max_size:
            raise SettingsError(
                f"{ENV_PREFIX}POOL_MIN_SIZE ({self.pool_min_size}) must not exceed "
                f"{ENV_PREFIX}POOL_MAX_SIZE ({self.pool_max_size})"
            )

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``) and ``overrides``.

        ``overrides`` with a value of None are ignored, so CLI flags that were not
        given do not mask the environment. ``LEDGER_*`` variables that name no
        setting are ignored (``LEDGER_TEST_*`` and others belong to other tools).
        """
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}  # field -> value as given
        labels: dict[str, str] = {}  # field -> where that value came from

        config_override = overrides.pop("config_file", None)
        config_path = env.get(f"{ENV_PREFIX}CONFIG") or config_override
        if config_path:
            path = Path(config_path)
            for key, value in _read_config_file(path).items():
                raw[key], labels[key] = value, f"{key} in {path}"
            raw["config_file"] = path
        for name in _SETTABLE:
            var = ENV_PREFIX + name.upper()
            if var in env:
                raw[name], labels[name] = env[var], var
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in _SETTABLE:
                raise SettingsError(f"unknown setting {name!r}")
            raw[name], labels[name] = value, f"--{name.replace('_', '-')}"
        _read_secret_file(raw, labels)

        values = {
            name: _prepare(_FIELD_TYPES[name], value, labels.get(name, name)) for name, value in raw.items()
        }
        try:
            return msgspec.convert(values, cls, strict=False, dec_hook=_dec_hook)
        except msgspec.ValidationError as e:
            raise SettingsError(_explain(str(e), values, labels)) from None

    @classmethod
    def from_dsn(cls, database_url: str, redis_url: str | None = None, **kw: Any) -> Settings:
        """Settings for explicit server URLs (tests, scripts); everything else default."""
        return cls.from_env({}, database_url=database_url, redis_url=redis_url, **kw)

    def redacted(self) -> dict[str, Any]:
        """A loggable view: secrets masked, passwords removed from URLs."""
        out: dict[str, Any] = {}
        for name in self.__struct_fields__:
            value = getattr(self, name)
            if name in _SECRET_FIELDS and value is not None:
                value = "[REDACTED]"
            elif name.endswith("_url") and value is not None:
                value = redact_url(value)
            elif isinstance(value, Path):
                value = str(value)
            elif name == "webhooks":
                # a Slack or Teams webhook URL is itself the credential: its path is the secret
                value = [{**msgspec.structs.asdict(w), "url": _origin(w.url) + "/***"} for w in value]
            out[name] = value
        return out


_SECRET_FIELDS = frozenset({"admin_key", "user_hash_secret", "webhook_secret"})
_URL_FIELDS = (
    ("database_url", ("postgresql", "postgres"), "postgresql://"),
    ("database_read_url", ("postgresql", "postgres"), "postgresql://"),
    ("redis_url", ("redis", "rediss", "unix"), "redis://"),
)
_SETTINGS_TYPE = mi.type_info(Settings)
assert isinstance(_SETTINGS_TYPE, mi.StructType)
_FIELD_TYPES: dict[str, mi.Type] = {f.name: f.type for f in _SETTINGS_TYPE.fields}
_SETTABLE = tuple(name for name in _FIELD_TYPES if name != "config_file")


def redact_url(url: str) -> str:
    """Drop the password from a URL so it can be printed or logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def _origin(url: str) -> str:
    """scheme://host[:port] of a URL (no user, path or query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


def _is_url(value: str, schemes: tuple[str, ...], *, query_ok: bool = False) -> bool:
    """A URL of one of ``schemes`` with a host (or, if ``query_ok``, a query such
    as ``?host=/run/postgresql``) and a valid port, if any."""
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a bad port
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname or (query_ok and parts.query))


# ---------------------------------------------------------------- reading


def _read_config_file(path: Path) -> dict[str, Any]:
    var = f"{ENV_PREFIX}CONFIG"
    try:
        # Decimal, not float: prices in the file are money and must stay exact.
        raw = tomllib.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
    except FileNotFoundError:
        raise SettingsError(f"{var} names {str(path)!r}, which does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(f"{var} file {str(path)!r} cannot be read: {e}") from e
    except tomllib.TOMLDecodeError as e:
        raise SettingsError(f"{var} file {str(path)!r} is not valid TOML: {e}") from e
    for key in raw:
        if key not in _SETTABLE:
            raise SettingsError(f"{var} file {str(path)!r}: unknown setting {key!r}")
    return raw


def _read_secret_file(raw: dict[str, Any], labels: dict[str, str]) -> None:
    """Put the contents of the file user_hash_secret_file names in user_hash_secret
    (checked as that); naming both is an error, as one would silently win."""
    given = raw.get("user_hash_secret_file")
    if not isinstance(given, str | Path) or not str(given).strip():
        return  # unset, or a bad value the conversion reports
    var, file_var = f"{ENV_PREFIX}USER_HASH_SECRET", f"{ENV_PREFIX}USER_HASH_SECRET_FILE"
    secret = raw.get("user_hash_secret")
    if secret is not None and (not isinstance(secret, str) or secret.strip()):
        raise SettingsError(f"set {var} or {file_var}, not both")
    path = Path(str(given).strip())
    try:
        contents = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(
            f"{file_var} names {str(path)!r}, which cannot be read: {type(e).__name__}"
        ) from None
    if not contents.strip():
        raise SettingsError(f"{file_var} names {str(path)!r}, which is empty")
    raw["user_hash_secret"], labels["user_hash_secret"] = contents, f"the contents of {file_var}"


_BOOL_WORDS = {"yes": "true", "on": "true", "no": "false", "off": "false"}


def _prepare(type_: mi.Type, value: Any, label: str) -> Any:
    """What a string means before conversion: surrounding blanks never matter,
    modes and booleans ignore case, numbers read as int() and float() read them,
    an empty optional text is unset, and a list of objects is JSON (with exact
    Decimal prices)."""
    if not isinstance(value, str):
        return value
    value = value.strip()
    optional = isinstance(type_, mi.UnionType)
    bare = _bare(type_)
    if optional and value == "" and isinstance(bare, mi.StrType):
        return None
    if isinstance(bare, mi.LiteralType):
        return value.lower()
    if isinstance(bare, mi.BoolType):
        return _BOOL_WORDS.get(value.lower(), value)
    if isinstance(bare, mi.IntType | mi.FloatType):
        # as int() and float() read them (".5", "+1", "1_000"), as before: only a form
        # msgspec refuses is rewritten (errors quote the value as given); what
        # int() and float() refuse too, the conversion explains
        kind: type = int if isinstance(bare, mi.IntType) else float
        try:
            msgspec.convert(value, kind, strict=False)
        except msgspec.ValidationError:
            try:
                return str(kind(value))
            except ValueError:
                return value
    if isinstance(bare, mi.VarTupleType):
        try:
            return json.loads(value, parse_float=Decimal)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{label} is not valid JSON: {e}") from None
    return value


def _dec_hook(type_: type, obj: Any) -> Any:
    """Paths, the one type msgspec does not convert itself."""
    if type_ is Path:
        if isinstance(obj, Path):
            return obj
        if isinstance(obj, str):
            if not obj.strip():
                raise ValueError("must not be empty")
            return Path(obj)
        raise ValueError("must be a path")
    raise NotImplementedError


# ---------------------------------------------------------------- errors

_PATH_RE = re.compile(r"\.([A-Za-z_]\w*)|\[(\d+)\]")
_BOUND_RE = re.compile(r"^Expected `\w+` (of length )?[<>]=? ")
_MISSING = object()


def _explain(message: str, values: Mapping[str, Any], labels: Mapping[str, str]) -> str:
    """msgspec's ``Expected `int` >= 1 - at `$.pool_min_size``` as the user's words:
    ``LEDGER_POOL_MIN_SIZE must be between 1 and 1000, got '0'``."""
    text, sep, at = message.rpartition(" - at `")
    if not sep:
        text, at = message, "$`"
    path: list[str | int] = [name or int(index) for name, index in _PATH_RE.findall(at.removesuffix("`"))]
    # The type and value at that path, and what to call it.
    type_: mi.Type = _SETTINGS_TYPE
    value: Any = values
    where = ""
    for step in path:
        type_ = _child(type_, step)
        value = _get(value, step)
        if not where:
            where = labels.get(str(step), str(step))
        else:
            where += f"[{step}]" if isinstance(step, int) else f".{step}"

    if text.startswith("Object contains unknown field "):
        return f"{where} has unknown field {text.rsplit(' ', 1)[1].strip('`')!r}"
    if text.startswith("Object missing required field "):
        return f"{where}.{text.rsplit(' ', 1)[1].strip('`')} is required"
    if text.startswith(("Expected ", "Invalid ")):
        must = _must(type_, bound=bool(_BOUND_RE.match(text)))
        secret = bool(path) and (path[0] in _SECRET_FIELDS or str(path[0]).endswith("_url"))
        shown = value if not secret and isinstance(value, str | int | float | Decimal) else _MISSING
        got = "" if shown is _MISSING else f", got {shown!r}"
        return f"{where} must be {must}{got}"
    # A ValueError of a __post_init__ ("base_url must be ...") or of _dec_hook ("must ...").
    first, _, rest = text.partition(" ")
    bare = _bare(type_)
    if isinstance(bare, mi.StructType) and first in {f.name for f in bare.fields}:
        if not where:  # a Settings field: named as the user named it
            return f"{labels.get(first, ENV_PREFIX + first.upper())} {rest}"
        return f"{where}.{first} {rest}"
    return f"{where} {text}".strip()


def _bare(type_: mi.Type) -> mi.Type:
    """The type under Optional and Annotated."""
    while True:
        if isinstance(type_, mi.UnionType):
            type_ = next(t for t in type_.types if not isinstance(t, mi.NoneType))
        elif isinstance(type_, mi.Metadata):
            type_ = type_.type
        else:
            return type_


def _child(type_: mi.Type, step: str | int) -> mi.Type:
    bare = _bare(type_)
    if isinstance(step, int) and isinstance(bare, mi.VarTupleType | mi.ListType):
        return bare.item_type
    if isinstance(step, str) and isinstance(bare, mi.StructType):
        return next((f.type for f in bare.fields if f.name == step), mi.AnyType())
    return mi.AnyType()


def _get(value: Any, step: str | int) -> Any:
    try:
        return value[step]
    except (KeyError, IndexError, TypeError):
        return _MISSING


def _must(type_: mi.Type, *, bound: bool) -> str:
    """What a value of ``type_`` must be; ``bound``: the value had the right kind
    but broke a bound, so say only the bound."""
    description = ""
    while isinstance(type_, mi.UnionType | mi.Metadata):
        if isinstance(type_, mi.Metadata):
            description = (type_.extra_json_schema or {}).get("description", description)
            type_ = type_.type
        else:
            type_ = next(t for t in type_.types if not isinstance(t, mi.NoneType))
    if description:
        return str(description)
    if isinstance(type_, mi.IntType | mi.FloatType):
        kind = "an integer" if isinstance(type_, mi.IntType) else "a number"
        if type_.ge is None or type_.le is None:
            return kind
        span = f"between {_num(type_.ge)} and {_num(type_.le)}"
        return span if bound else f"{kind} {span}"
    if isinstance(type_, mi.StrType):
        if bound and type_.min_length:
            n = type_.min_length
            return f"at least {n} characters long" if n > 1 else "not empty"
        return "a string"
    if isinstance(type_, mi.LiteralType):
        values = _MODE_ORDER.get(frozenset(type_.values), type_.values)
        return "one of " + ", ".join(str(v) for v in values)
    if isinstance(type_, mi.BoolType):
        return "true or false"
    if isinstance(type_, mi.DecimalType):
        return "a number"
    if isinstance(type_, mi.VarTupleType | mi.ListType):
        return "a list of objects" if isinstance(_bare(type_.item_type), mi.StructType) else "a list"
    if isinstance(type_, mi.StructType):
        return "an object"
    if isinstance(type_, mi.CustomType) and type_.cls is Path:
        return "a path"
    return "valid"


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)
