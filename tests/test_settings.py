"""Settings: defaults, environment, TOML file, and one clear error per bad variable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import msgspec
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
            "LEDGER_WEBHOOKS": '[{"name": "ops", "url": "https://hooks.slack.com/services/T0/B0/sEcReTpAtH"}]',
        }
    )
    shown = repr(s.redacted())
    assert "hunter2" not in shown
    assert "a-very-secret-admin-key" not in shown
    assert "sEcReTpAtH" not in shown  # a webhook URL's path is its credential
    assert "https://hooks.slack.com/***" in shown
    assert redact_url("redis://:pw@h:1/0") == "redis://:***@h:1/0"


def test_cli_reports_bad_setting_without_traceback() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ledger.run.cli", "migrate"],
        env={"LEDGER_DATABASE_URL": "nonsense", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert "LEDGER_DATABASE_URL is not a valid postgresql:// URL" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ issue 15: settings as types

# Every mode and its values, as the README lists them; the first test fails when
# a Literal setting is added without being listed here.
MODES = {
    "LEDGER_LOG_FORMAT": ("json", "console"),
    "LEDGER_LOG_LEVEL": ("debug", "info", "warning", "error"),
    "LEDGER_COMMIT_MODE": ("durable", "fast"),
    "LEDGER_ON_REDIS_DOWN": ("deny", "allow"),
    "LEDGER_KEY_SCOPE_DEFAULT": ("own", "any"),
    "LEDGER_UNPRICED_POLICY": ("auto", "deny", "allow"),
}


def _refusal(env: dict[str, str], **overrides: object) -> str:
    with pytest.raises(SettingsError) as e:
        Settings.from_env(env, **overrides)
    return str(e.value)


def test_every_mode_is_listed() -> None:
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    literals = {
        "LEDGER_" + f.name.upper(): set(f.type.values)
        for f in info.fields
        if isinstance(f.type, msgspec.inspect.LiteralType)
    }
    assert literals == {var: set(values) for var, values in MODES.items()}


@pytest.mark.parametrize(("var", "values"), MODES.items())
def test_a_mode_takes_its_values_in_any_case_and_refuses_others(var: str, values: tuple[str, ...]) -> None:
    field = var.removeprefix("LEDGER_").lower()
    for value in values:
        assert getattr(Settings.from_env({var: f" {value.upper()} "}), field) == value
    assert _refusal({var: "sometimes"}) == f"{var} must be one of {', '.join(values)}, got 'sometimes'"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"LEDGER_POOL_MIN_SIZE": "x"},
            "LEDGER_POOL_MIN_SIZE must be an integer between 1 and 1000, got 'x'",
        ),
        ({"LEDGER_POOL_MIN_SIZE": "0"}, "LEDGER_POOL_MIN_SIZE must be between 1 and 1000, got '0'"),
        ({"LEDGER_WORKERS": "65"}, "LEDGER_WORKERS must be between 1 and 64, got '65'"),
        (
            {"LEDGER_POLL_INTERVAL_S": "0.001"},
            "LEDGER_POLL_INTERVAL_S must be between 0.01 and 3600, got '0.001'",
        ),
        (
            {"LEDGER_RESERVATION_TTL_S": "inf"},
            "LEDGER_RESERVATION_TTL_S must be between 1 and 604800, got 'inf'",
        ),
        (
            {"LEDGER_MAX_ADMIN_BODY_BYTES": "100"},
            "LEDGER_MAX_ADMIN_BODY_BYTES must be between 1024 and 16777216, got '100'",
        ),
        ({"LEDGER_RUN_PROJECTIONS": "maybe"}, "LEDGER_RUN_PROJECTIONS must be true or false, got 'maybe'"),
        (
            {"LEDGER_WEBHOOKS": '[{"name": "ops", "url": "https://h/x", "max_attempts": 0}]'},
            "LEDGER_WEBHOOKS[0].max_attempts must be between 1 and 50, got 0",
        ),
        (
            {"LEDGER_PROVIDERS": '[{"name": "OpenAI", "base_url": "https://h/v1"}]'},
            "LEDGER_PROVIDERS[0].name must be a lower-case name like 'openai', got 'OpenAI'",
        ),
        (
            {"LEDGER_PROVIDERS": '[{"name": "a", "base_url": "ftp://h/v1"}]'},
            "LEDGER_PROVIDERS[0].base_url must be an http(s) URL",
        ),
        (
            {"LEDGER_PROVIDERS": '[{"name": "a", "base_url": "https://h", "key": "k"}]'},
            "LEDGER_PROVIDERS[0] has unknown field 'key'",
        ),
        ({"LEDGER_PROVIDERS": '{"name": "a"}'}, "LEDGER_PROVIDERS must be a list of objects"),
        (
            {"LEDGER_PRICE_OVERRIDES": '[{"model": "m", "input_per_mtok": 1}]'},
            "LEDGER_PRICE_OVERRIDES[0].output_per_mtok is required",
        ),
        (
            {"LEDGER_PRICE_OVERRIDES": '[{"model": "m", "input_per_mtok": -1, "output_per_mtok": 1}]'},
            "LEDGER_PRICE_OVERRIDES[0].input_per_mtok must be a finite number >= 0",
        ),
    ],
)
def test_a_bad_value_names_its_variable_and_the_bound(env: dict[str, str], message: str) -> None:
    assert _refusal(env) == message


def test_a_bad_value_names_the_file_key_or_the_flag_it_came_from(tmp_path: Path) -> None:
    cfg = tmp_path / "ledger.toml"
    cfg.write_text("workers = 0\n")
    assert _refusal({"LEDGER_CONFIG": str(cfg)}) == f"workers in {cfg} must be between 1 and 64, got 0"
    assert _refusal({}, port=70000) == "--port must be between 0 and 65535, got 70000"
    assert _refusal({}, colour="blue") == "unknown setting 'colour'"


def test_a_refused_secret_is_not_repeated() -> None:
    for var in ("LEDGER_ADMIN_KEY", "LEDGER_WEBHOOK_SECRET", "LEDGER_USER_HASH_SECRET"):
        message = _refusal({var: "tiny-secret"})
        assert message.startswith(f"{var} must be at least")
        assert "tiny-secret" not in message


def test_booleans_take_their_usual_words() -> None:
    for word, value in [
        ("yes", True),
        ("On", True),
        ("1", True),
        ("no", False),
        ("OFF", False),
        ("0", False),
    ]:
        assert Settings.from_env({"LEDGER_RUN_PROJECTIONS": word}).run_projections is value


def test_an_unknown_ledger_variable_is_ignored() -> None:
    """As before issue 15: other tools read LEDGER_TEST_* and the like; config_file
    is set only through LEDGER_CONFIG."""
    unknown = {"LEDGER_COLOUR": "blue", "LEDGER_TEST_DATABASE_URL": "x", "LEDGER_CONFIG_FILE": "/nonexistent"}
    assert Settings.from_env(unknown) == Settings.from_env({})


def test_numbers_take_what_int_and_float_took_before_msgspec() -> None:
    """Values an existing deployment may set (``.5``, ``5.``, ``+1``, ``1_000``) were
    read by int()/float() before the settings became msgspec Structs; refusing them
    now would stop such a deployment at start."""
    s = Settings.from_env(
        {
            "LEDGER_WRITER_MAX_WAIT_MS": ".5",
            "LEDGER_CONNECT_TIMEOUT_S": "5.",
            "LEDGER_PORT": "+4001",
            "LEDGER_WRITER_QUEUE_SIZE": "20_000",
        }
    )
    assert (s.writer_max_wait_ms, s.connect_timeout_s, s.port, s.writer_queue_size) == (0.5, 5.0, 4001, 20000)
    assert _refusal({"LEDGER_CONNECT_TIMEOUT_S": "nan"}).startswith("LEDGER_CONNECT_TIMEOUT_S must be")
    assert _refusal({"LEDGER_CONNECT_TIMEOUT_S": "inf"}).startswith("LEDGER_CONNECT_TIMEOUT_S must be")


def test_an_empty_optional_value_is_unset() -> None:
    s = Settings.from_env({"LEDGER_DATABASE_URL": " ", "LEDGER_ADMIN_KEY": "", "LEDGER_DEFAULT_PROVIDER": ""})
    assert (s.database_url, s.admin_key, s.default_provider) == (None, None, None)


@pytest.mark.parametrize("command", ["serve", "dev"])
def test_serve_and_dev_name_the_bad_variable(command: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "ledger.run.cli", command],
        env={"LEDGER_ON_REDIS_DOWN": "maybe", "LEDGER_DATA_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "ledger: configuration error: LEDGER_ON_REDIS_DOWN must be one of deny, allow, got 'maybe'"
    )
    assert list(tmp_path.iterdir()) == []  # refused before anything was started
