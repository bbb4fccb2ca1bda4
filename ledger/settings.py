"""Settings: one frozen object built from the environment and an optional TOML file.

Precedence: explicit overrides (CLI flags) > ``LEDGER_*`` environment variables >
the TOML file named by ``LEDGER_CONFIG`` > defaults. Every field has a safe
default; every bad value raises :class:`SettingsError` naming the variable.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ledger.errors import SettingsError

ENV_PREFIX = "LEDGER_"

LOG_FORMATS = ("json", "console")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True, slots=True)
class Settings:
    # Servers. None means "not configured": `ledger dev` then starts embedded ones.
    database_url: str | None = None
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

    # Budgets: an admitted request not settled within the reservation TTL is
    # swept (charged at its estimate); the sweeper looks every sweep interval.
    reservation_ttl_s: float = 600.0
    sweep_interval_s: float = 5.0

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
        settings = cls(**values)
        settings.validate()
        return settings

    @classmethod
    def from_dsn(cls, database_url: str, redis_url: str | None = None, **kw: Any) -> Settings:
        """Settings for explicit server URLs (tests, scripts); everything else default."""
        return cls.from_env({}, database_url=database_url, redis_url=redis_url, **kw)

    def validate(self) -> None:
        """Cross-field checks (single fields are checked when parsed)."""
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


_SECRET_FIELDS = frozenset({"admin_key"})


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
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
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


_PARSERS: dict[str, Callable[[str, Any], Any]] = {
    "database_url": _url(("postgresql", "postgres"), "postgresql://"),
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
    "reservation_ttl_s": _float(1, 7 * 86400),
    "sweep_interval_s": _float(0.05, 3600),
}
