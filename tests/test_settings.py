"""Settings: defaults, environment, TOML file, and one clear error per bad variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ledger.errors import SettingsError
from ledger.settings import Settings, redact_url


def test_defaults_are_safe() -> None:
    s = Settings.from_env({})
    assert s.database_url is None
    assert s.redis_url is None
    assert s.host == "127.0.0.1"
    assert s.port == 4000
    assert s.log_format == "json"


def test_environment_is_read() -> None:
    s = Settings.from_env(
        {
            "LEDGER_DATABASE_URL": "postgresql://u:p@db:5432/ledger",
            "LEDGER_REDIS_URL": "redis://cache:6379/1",
            "LEDGER_PORT": "8080",
            "LEDGER_WRITER_MAX_WAIT_MS": "0.5",
            "LEDGER_LOG_FORMAT": "CONSOLE",
        }
    )
    assert s.database_url == "postgresql://u:p@db:5432/ledger"
    assert s.port == 8080
    assert s.writer_max_wait_ms == 0.5
    assert s.log_format == "console"


@pytest.mark.parametrize(
    ("var", "value", "message"),
    [
        (
            "LEDGER_DATABASE_URL",
            "mysql://x/y",
            "LEDGER_DATABASE_URL is not a valid postgresql:// URL",
        ),
        (
            "LEDGER_DATABASE_URL",
            "postgresql://host:notaport/db",
            "LEDGER_DATABASE_URL is not a valid",
        ),
        ("LEDGER_REDIS_URL", "http://x", "LEDGER_REDIS_URL is not a valid redis:// URL"),
        ("LEDGER_PORT", "eighty", "LEDGER_PORT must be an integer"),
        ("LEDGER_PORT", "70000", "LEDGER_PORT must be between 0 and 65535"),
        ("LEDGER_POOL_MAX_SIZE", "0", "LEDGER_POOL_MAX_SIZE must be between"),
        ("LEDGER_APPEND_TIMEOUT_S", "nan", "LEDGER_APPEND_TIMEOUT_S must be between"),
        ("LEDGER_APPEND_TIMEOUT_S", "soon", "LEDGER_APPEND_TIMEOUT_S must be a number"),
        ("LEDGER_LOG_FORMAT", "xml", "LEDGER_LOG_FORMAT must be one of json, console"),
        ("LEDGER_LOG_LEVEL", "loud", "LEDGER_LOG_LEVEL must be one of"),
        ("LEDGER_ADMIN_KEY", "short", "LEDGER_ADMIN_KEY must be at least 16 characters"),
        ("LEDGER_HOST", "a b", "LEDGER_HOST must be a host name"),
        ("LEDGER_DATA_DIR", "  ", "LEDGER_DATA_DIR must not be empty"),
        ("LEDGER_WRITER_MAX_BATCH", "-5", "LEDGER_WRITER_MAX_BATCH must be between"),
        ("LEDGER_CONFIG", "/nonexistent/ledger.toml", "LEDGER_CONFIG names"),
    ],
)
def test_each_bad_variable_has_its_own_error(var: str, value: str, message: str) -> None:
    with pytest.raises(SettingsError, match="^" + message.replace(".", r"\.").replace("/", "/")):
        Settings.from_env({var: value})


def test_cross_field_check() -> None:
    with pytest.raises(SettingsError, match="LEDGER_POOL_MIN_SIZE"):
        Settings.from_env({"LEDGER_POOL_MIN_SIZE": "20", "LEDGER_POOL_MAX_SIZE": "10"})


def test_toml_file_and_precedence(tmp_path: Path) -> None:
    cfg = tmp_path / "ledger.toml"
    cfg.write_text('port = 5001\nlog_level = "debug"\nredis_url = "redis://r:6379/0"\n')
    s = Settings.from_env({"LEDGER_CONFIG": str(cfg), "LEDGER_PORT": "5002"})
    assert s.port == 5002  # environment beats file
    assert s.log_level == "debug"
    assert s.redis_url == "redis://r:6379/0"
    assert Settings.from_env({"LEDGER_CONFIG": str(cfg)}, port=5003).port == 5003  # flag beats all


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("port = [", "is not valid TOML"),
        ("colour = 'blue'", "unknown setting 'colour'"),
        ("port = 'x'", "port in .* must be an integer"),
    ],
)
def test_bad_config_file(tmp_path: Path, content: str, message: str) -> None:
    cfg = tmp_path / "ledger.toml"
    cfg.write_text(content)
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"LEDGER_CONFIG": str(cfg)})


def test_secrets_are_redacted() -> None:
    s = Settings.from_env(
        {
            "LEDGER_DATABASE_URL": "postgresql://app:hunter2@db/ledger",
            "LEDGER_ADMIN_KEY": "a-very-secret-admin-key",
        }
    )
    shown = repr(s.redacted())
    assert "hunter2" not in shown
    assert "a-very-secret-admin-key" not in shown
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"


def test_cli_reports_bad_setting_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ledger.cli", "migrate"],
        env={"LEDGER_DATABASE_URL": "nonsense", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "LEDGER_DATABASE_URL is not a valid postgresql:// URL" in proc.stderr
    assert "Traceback" not in proc.stderr
