"""Settings: one frozen object built from the environment and an optional TOML file.

Precedence: explicit overrides (CLI flags) > ``LEDGER_*`` environment variables >
the TOML file named by ``LEDGER_CONFIG`` > defaults. Every field has a safe
default; every bad value raises :class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ledger.errors import SettingsError

ENV_PREFIX = "LEDGER_"

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """An upstream: OpenAI-compatible API at ``base_url``."""

    name: str
    base_url: str
    api_key_env: str | None = None  # the key is read from this environment variable
    models: tuple[str, ...] = ()  # bare model names this provider serves ("" = any)
    price_provider: str | None = None  # genai-prices provider id (default: name)


@dataclass(frozen=True, slots=True)
class PriceOverride:
    """Operator price for a model, USD per million tokens (beats genai-prices)."""

    model: str
    input_per_mtok: Decimal
    output_per_mtok: Decimal
    cached_input_per_mtok: Decimal | None = None
    provider: str | None = None  # None: any provider


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """Where budget alerts go: every alert, or those of some tags."""

    name: str
    url: str
    tags: tuple[str, ...] = ()  # empty: every tag
    format: str = "json"  # "json" or "slack"
    max_attempts: int = 5
    timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class Settings:
    # Servers. None means "not configured": `ledger dev` then starts embedded ones.
    database_url: str | None = None
    # A streaming replica for spend reports and the dashboard's reads (None: the
    # primary); the request path, admin writes and projections stay on the primary.
    database_read_url: str | None = None
    redis_url: str | None = None

    # HTTP
    host: str = "127.0.0.1"
    port: int = 4000
    admin_key: str | None = None
    data_dir: Path = Path(".data")

    # Logging
    log_format: str = "json"
    log_level: str = "info"

    # PostgreSQL pool and event writer (group commit)
    pool_min_size: int = 2
    pool_max_size: int = 10
    connect_timeout_s: float = 3.0
    statement_timeout_s: float = 10.0
    writer_max_batch: int = 2000
    writer_max_wait_ms: float = 2.0
    writer_queue_size: int = 20000
    append_timeout_s: float = 5.0
    poll_interval_s: float = 1.0
    redis_max_connections: int = 64
    # Projection workers in every gateway process (one active per projection,
    # the others standing by); set false to run `ledger projections run` apart.
    run_projections: bool = True
    # "durable": an append is acknowledged once its commit is on disk (fsync).
    # "fast": once PostgreSQL has it in memory (synchronous_commit=off): a crash
    # of the database host may lose the last few hundred ms of events, which the
    # sweeper then charges at their estimates; a gateway crash loses nothing.
    commit_mode: str = "durable"
    # HTTP worker processes of `ledger serve`, sharing the port (SO_REUSEPORT);
    # projection and alert workers run in the first one only.
    workers: int = 1
    # Redis down: "deny" answers 503 (budgets cannot be checked); "allow" admits
    # and records, then rebuilds the counters from the log once Redis is back.
    on_redis_down: str = "deny"
    # The tags a client key made without allowed_tags may carry: "own" (its own tags
    # and those under them) or "any" (LiteLLM's behaviour: any tag, any budget).
    key_scope_default: str = "own"

    # Budgets: an admitted request not settled within the reservation TTL is
    # swept (charged at its estimate); the sweeper looks every sweep interval.
    # It must outlast the longest request (the upstream total timeout) and the
    # two commits around it, or a request still running could be swept.
    reservation_ttl_s: float = 900.0
    sweep_interval_s: float = 5.0

    # Gateway: upstream providers and request handling
    providers: tuple[ProviderConfig, ...] = ()
    default_provider: str | None = None
    upstream_connect_timeout_s: float = 5.0
    upstream_first_byte_timeout_s: float = 120.0
    upstream_total_timeout_s: float = 600.0
    max_body_bytes: int = 8 * 1024 * 1024
    # Slow clients: a connection must deliver a whole request head within
    # client_header_timeout_s of opening or of its previous response (so idle
    # keep-alive connections close too; longer than a reverse proxy's own idle
    # timeout, nginx's is 60 s, or it may reuse one just closed), and a request
    # body within client_body_timeout_s of the head; else it is closed (408).
    client_header_timeout_s: float = 75.0
    client_body_timeout_s: float = 60.0
    max_response_bytes: int = 64 * 1024 * 1024
    # Attribution limits
    max_tags: int = 64
    max_tag_length: int = 256
    max_metadata_bytes: int = 16 * 1024
    # End-user ids are stored as HMAC-SHA256 with this secret (>= 32 chars), or
    # with the contents of user_hash_secret_file (a mounted secret), so that a
    # database dump alone cannot confirm a guessed e-mail. Unset: a secret
    # generated once and kept in the database (`ledger serve` warns).
    user_hash_secret: str | None = None
    user_hash_secret_file: Path | None = field(default=None, compare=False)
    # Pricing: "auto" denies unpriced models only for requests with a budgeted
    # tag; "deny" always; "allow" records cost 0 flagged as unpriced.
    unpriced_policy: str = "auto"
    default_max_tokens: int = 4096  # output bound for estimates when the request sets none
    image_token_bound: int = 2000  # input bound per image part
    file_token_bound: int = 200_000  # input bound per file sent by id (no size known)
    price_overrides: tuple[PriceOverride, ...] = ()

    # Alerts: webhooks, and the key their bodies are signed with (X-Ledger-Signature).
    # Unset secret: one generated once and kept in the database.
    webhooks: tuple[WebhookConfig, ...] = ()
    webhook_secret: str | None = None

    config_file: Path | None = field(default=None, compare=False)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        **overrides: Any,
    ) -> Settings:
        """Build settings from ``environ`` (default ``os.environ``) and ``overrides``.

        ``overrides`` with a value of None are ignored, so CLI flags that were not
        given do not mask the environment.
        """
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}

        config_path = env.get(f"{ENV_PREFIX}CONFIG") or overrides.pop("config_file", None)
        if config_path:
            values.update(_read_config_file(Path(config_path)))
            values["config_file"] = Path(config_path)

        for f in dataclasses.fields(cls):
            var = ENV_PREFIX + f.name.upper()
            if var in env and f.name != "config_file":
                values[f.name] = _parse(f.name, var, env[var])
        for name, value in overrides.items():
            if value is None:
                continue
            if name not in _PARSERS:
                raise SettingsError(f"unknown setting {name!r}")
            values[name] = _parse(name, f"--{name.replace('_', '-')}", value)
        _secret_file(values, "user_hash_secret", "user_hash_secret_file", 32)
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def from_dsn(cls, database_url: str, redis_url: str | None = None, **kw: Any) -> Settings:
        """Settings for explicit server URLs (tests, scripts); everything else default."""
        return cls.from_env({}, database_url=database_url, redis_url=redis_url, **kw)

    def validate(self) -> None:
        """Cross-field checks (single fields are checked when parsed)."""
        names = [p.name for p in self.providers]
        if len(set(names)) != len(names):
            raise SettingsError(f"{ENV_PREFIX}PROVIDERS names a provider twice")
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

    def redacted(self) -> dict[str, Any]:
        """A loggable view: secrets masked, passwords removed from URLs."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in _SECRET_FIELDS and value is not None:
                value = "[REDACTED]"
            elif f.name.endswith("_url") and value is not None:
                value = redact_url(value)
            elif isinstance(value, Path):
                value = str(value)
            out[f.name] = value
        return out


_SECRET_FIELDS = frozenset({"admin_key", "user_hash_secret", "webhook_secret"})


def redact_url(url: str) -> str:
    """Drop the password from a URL so it can be printed or logged."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


# ---------------------------------------------------------------- parsing


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
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _PARSERS:
            raise SettingsError(f"{var} file {str(path)!r}: unknown setting {key!r}")
        values[key] = _parse(key, f"{key} in {path}", value)
    return values


def _parse(name: str, label: str, raw: Any) -> Any:
    return _PARSERS[name](label, raw)


def _text(label: str, raw: Any) -> str:
    if not isinstance(raw, str):
        raise SettingsError(f"{label} must be a string")
    return raw


def _optional_text(label: str, raw: Any) -> str | None:
    value = _text(label, raw).strip()
    return value or None


def _url(schemes: tuple[str, ...], what: str) -> Callable[[str, Any], str | None]:
    def parse(label: str, raw: Any) -> str | None:
        value = _text(label, raw).strip()
        if not value:
            return None
        try:
            parts = urlsplit(value)
            _ = parts.port  # raises ValueError on a bad port
        except ValueError:
            parts = None
        if parts is None or parts.scheme not in schemes or not (parts.hostname or parts.query):
            raise SettingsError(f"{label} is not a valid {what} URL")
        return value

    return parse


def _int(minimum: int, maximum: int) -> Callable[[str, Any], int]:
    def parse(label: str, raw: Any) -> int:
        if isinstance(raw, bool):
            raise SettingsError(f"{label} must be an integer")
        try:
            value = int(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{label} must be an integer, got {raw!r}") from None
        if not minimum <= value <= maximum:
            raise SettingsError(f"{label} must be between {minimum} and {maximum}, got {value}")
        return value

    return parse


def _float(minimum: float, maximum: float) -> Callable[[str, Any], float]:
    def parse(label: str, raw: Any) -> float:
        if isinstance(raw, bool):
            raise SettingsError(f"{label} must be a number")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise SettingsError(f"{label} must be a number, got {raw!r}") from None
        if not math.isfinite(value) or not minimum <= value <= maximum:
            raise SettingsError(f"{label} must be between {minimum:g} and {maximum:g}")
        return value

    return parse


def _choice(choices: tuple[str, ...]) -> Callable[[str, Any], str]:
    def parse(label: str, raw: Any) -> str:
        value = _text(label, raw).strip().lower()
        if value not in choices:
            raise SettingsError(f"{label} must be one of {', '.join(choices)}; got {raw!r}")
        return value

    return parse


def _bool(label: str, raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    value = _text(label, raw).strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise SettingsError(f"{label} must be true or false, got {raw!r}")


def _path(label: str, raw: Any) -> Path:
    if isinstance(raw, Path):
        return raw
    value = _text(label, raw).strip()
    if not value:
        raise SettingsError(f"{label} must not be empty")
    return Path(value)


def _admin_key(label: str, raw: Any) -> str | None:
    value = _optional_text(label, raw)
    if value is not None and len(value) < 16:
        raise SettingsError(f"{label} must be at least 16 characters long")
    return value


def _host(label: str, raw: Any) -> str:
    value = _text(label, raw).strip()
    if not value or any(c.isspace() for c in value):
        raise SettingsError(f"{label} must be a host name or address")
    return value


_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _json_list(label: str, raw: Any) -> list[Any]:
    if isinstance(raw, str):
        try:
            raw = json.loads(raw, parse_float=Decimal)  # prices stay exact
        except json.JSONDecodeError as e:
            raise SettingsError(f"{label} is not valid JSON: {e}") from None
    if not isinstance(raw, list) or not all(isinstance(x, dict) for x in raw):
        raise SettingsError(f"{label} must be a list of objects")
    return raw


def _providers(label: str, raw: Any) -> tuple[ProviderConfig, ...]:
    out = []
    for i, item in enumerate(_json_list(label, raw)):
        where = f"{label}[{i}]"
        unknown = set(item) - {"name", "base_url", "api_key_env", "models", "price_provider"}
        if unknown:
            raise SettingsError(f"{where} has unknown field(s) {sorted(unknown)}")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise SettingsError(f"{where}.name must be a lower-case name like 'openai'")
        base_url = item.get("base_url")
        parts = urlsplit(base_url) if isinstance(base_url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"{where}.base_url must be an http(s) URL")
        key_env = item.get("api_key_env")
        if key_env is not None and (not isinstance(key_env, str) or not _ENV_NAME_RE.match(key_env)):
            raise SettingsError(f"{where}.api_key_env must name an environment variable")
        models = item.get("models", [])
        if not isinstance(models, list) or not all(isinstance(m, str) and m for m in models):
            raise SettingsError(f"{where}.models must be a list of model names")
        price_provider = item.get("price_provider")
        if price_provider is not None and not isinstance(price_provider, str):
            raise SettingsError(f"{where}.price_provider must be a string")
        out.append(ProviderConfig(name, base_url.rstrip("/"), key_env, tuple(models), price_provider))
    return tuple(out)


def _price(where: str, item: dict[str, Any], key: str, required: bool) -> Decimal | None:
    value = item.get(key)
    if value is None:
        if required:
            raise SettingsError(f"{where}.{key} is required (USD per million tokens)")
        return None
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise SettingsError(f"{where}.{key} must be a number") from None
    if not price.is_finite() or price < 0:
        raise SettingsError(f"{where}.{key} must be a finite number >= 0")
    return price


def _price_overrides(label: str, raw: Any) -> tuple[PriceOverride, ...]:
    out = []
    for i, item in enumerate(_json_list(label, raw)):
        where = f"{label}[{i}]"
        model = item.get("model")
        if not isinstance(model, str) or not model:
            raise SettingsError(f"{where}.model must be a model name")
        provider = item.get("provider")
        if provider is not None and not isinstance(provider, str):
            raise SettingsError(f"{where}.provider must be a string")
        inp = _price(where, item, "input_per_mtok", True)
        outp = _price(where, item, "output_per_mtok", True)
        assert inp is not None
        assert outp is not None
        cached = _price(where, item, "cached_input_per_mtok", False)
        out.append(PriceOverride(model, inp, outp, cached, provider))
    return tuple(out)


def _webhooks(label: str, raw: Any) -> tuple[WebhookConfig, ...]:
    out = []
    for i, item in enumerate(_json_list(label, raw)):
        where = f"{label}[{i}]"
        unknown = set(item) - {"name", "url", "tags", "format", "max_attempts", "timeout_s"}
        if unknown:
            raise SettingsError(f"{where} has unknown field(s) {sorted(unknown)}")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise SettingsError(f"{where}.name must be a lower-case name like 'ops'")
        url = item.get("url")
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            raise SettingsError(f"{where}.url must be an http(s) URL")
        tags = item.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, str) and t for t in tags):
            raise SettingsError(f"{where}.tags must be a list of tag names")
        fmt = item.get("format", "json")
        if fmt not in ("json", "slack"):
            raise SettingsError(f"{where}.format must be json or slack")
        attempts = _int(1, 50)(f"{where}.max_attempts", item.get("max_attempts", 5))
        timeout = _float(0.1, 120)(f"{where}.timeout_s", item.get("timeout_s", 5.0))
        out.append(WebhookConfig(name, url, tuple(tags), fmt, attempts, timeout))
    if len({w.name for w in out}) != len(out):
        raise SettingsError(f"{label} names a webhook twice")
    return tuple(out)


def _secret_file(values: dict[str, Any], name: str, file_name: str, minimum: int) -> None:
    """Fill ``values[name]`` from the file ``values[file_name]`` names (trailing
    newline dropped); naming both is an error, as one would silently win."""
    path = values.get(file_name)
    if path is None:
        return
    var, file_var = ENV_PREFIX + name.upper(), ENV_PREFIX + file_name.upper()
    if values.get(name) is not None:
        raise SettingsError(f"set {var} or {file_var}, not both")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SettingsError(
            f"{file_var} names {str(path)!r}, which cannot be read: {type(e).__name__}"
        ) from None
    values[name] = _secret(minimum)(f"the contents of {file_var}", raw)
    if values[name] is None:
        raise SettingsError(f"{file_var} names {str(path)!r}, which is empty")


def _secret(minimum: int) -> Callable[[str, Any], str | None]:
    def parse(label: str, raw: Any) -> str | None:
        value = _optional_text(label, raw)
        if value is not None and len(value) < minimum:
            raise SettingsError(f"{label} must be at least {minimum} characters long")
        return value

    return parse


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "database_url": _url(("postgresql", "postgres"), "postgresql://"),
    "database_read_url": _url(("postgresql", "postgres"), "postgresql://"),
    "redis_url": _url(("redis", "rediss", "unix"), "redis://"),
    "host": _host,
    "port": _int(0, 65535),
    "admin_key": _admin_key,
    "data_dir": _path,
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "pool_min_size": _int(1, 1000),
    "pool_max_size": _int(1, 1000),
    "connect_timeout_s": _float(0.1, 300),
    "statement_timeout_s": _float(0.1, 3600),
    "writer_max_batch": _int(1, 100_000),
    "writer_max_wait_ms": _float(0, 1000),
    "writer_queue_size": _int(1, 10_000_000),
    "append_timeout_s": _float(0.1, 600),
    "poll_interval_s": _float(0.01, 3600),
    "redis_max_connections": _int(1, 10_000),
    "run_projections": _bool,
    "workers": _int(1, 64),
    "commit_mode": _choice(("durable", "fast")),
    "on_redis_down": _choice(("deny", "allow")),
    "key_scope_default": _choice(("own", "any")),
    "reservation_ttl_s": _float(1, 7 * 86400),
    "providers": _providers,
    "default_provider": _optional_text,
    "upstream_connect_timeout_s": _float(0.1, 600),
    "upstream_first_byte_timeout_s": _float(0.1, 3600),
    "upstream_total_timeout_s": _float(0.1, 86400),
    "max_body_bytes": _int(1024, 1024**3),
    "client_header_timeout_s": _float(0.05, 3600),
    "client_body_timeout_s": _float(0.05, 3600),
    "max_response_bytes": _int(1024, 1024**3),
    "max_tags": _int(1, 10_000),
    "max_tag_length": _int(1, 10_000),
    "max_metadata_bytes": _int(64, 1024**2),
    "user_hash_secret": _secret(32),
    "user_hash_secret_file": _path,
    "unpriced_policy": _choice(("auto", "deny", "allow")),
    "default_max_tokens": _int(1, 10_000_000),
    "image_token_bound": _int(1, 1_000_000),
    "file_token_bound": _int(1, 10_000_000),
    "price_overrides": _price_overrides,
    "webhooks": _webhooks,
    "webhook_secret": _secret(16),
    "sweep_interval_s": _float(0.05, 3600),
}
