"""Issue 11 item 5: secrets in metadata are redacted by detect-secrets' rules plus the
key-name rule, and a tag that looks like a credential is refused, never stored."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from pytest_aiohttp import AiohttpServer

from gateway.appkeys import KEY_BOOK, STORE
from gateway.mock_upstream import create_mock_app
from ledger import events as ev
from ledger.domain.privacy import REDACTED
from ledger.settings import ProviderConfig, Settings, SettingsError
from tests.conftest import gateway_app
from tests.test_proxy import CHAT, Gateway, gateway

__all__ = ["gateway"]  # the fixture, imported for this module

# Each was stored as sent before detect-secrets' rules: (label, value)
SECRET_SHAPES: list[tuple[str, str]] = [
    ("bearer in free text", "retry with Authorization: Bearer abcDEF123.ghiJKL456.mno"),
    ("postgres url with password", "postgres://admin:pw@db.internal:5432/ledger"),
    ("basic auth", "Basic YWRtaW46aHVudGVyMg=="),
    ("gitlab", "glpat-Ab3dEf6hIj9kLm2nOp5q"),
    ("github fine-grained", "github_pat_11ABCDEFG0aBcDeFgHiJkLmN_0123456789abcdefABCDEF"),
    ("github classic", "ghp_" + "aB3dE6gH9jK2mN5pQ8sT1vW4yZ7bC0eF3hI6"),
    ("hugging face", "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345"),
    ("aws secret key", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("aws key id", "AKIAIOSFODNN7EXAMPLE"),
    ("azure account key", "DefaultEndpointsProtocol=https;AccountName=acme;AccountKey=" + "Zm9vYmFy" * 11),
    ("google oauth", "ya29.a0AfH6SMBx3kLmNoPqRsTuVwXyZ0123456789"),
    ("openai project key", "sk-proj-SECRETSECRET0123456789"),
    ("stripe", "sk_live_" + "4eC39HqLyjWDarjtT1zdp7dc"),
    ("slack", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("jwt", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U"),
    ("pem", "-----BEGIN RSA PRIVATE KEY-----"),
]
SECRET_NAMES = [
    "passWord",
    "dbpassword",
    "secretkey",
    "privatekey",
    "openai_key",
    "X-Auth-Token",
    "credentials",
]
PLAIN: dict[str, Any] = {
    "customer": "acme-corporation-international",
    "order": "order-2026-000123",
    "trace": "550e8400-e29b-41d4-a716-446655440000",
    "commit": "f47ac10b58cc4372a5670e02b2c3d479f47ac10b",
    "max_tokens": 40,
    "author": "ana",
    "note": "the bearer of this note is a person",
}


async def _chat(gw: Gateway, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"{gw.url}/v1/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {gw.key}", **(headers or {})},
        ) as r,
    ):
        return r.status, await r.json()


async def test_secret_values_and_names_are_redacted_and_the_rest_kept(gateway: Gateway) -> None:
    metadata: dict[str, Any] = {label: value for label, value in SECRET_SHAPES}
    metadata |= {name: "an-ordinary-value" for name in SECRET_NAMES}
    metadata |= PLAIN
    status, body = await _chat(gateway, {**CHAT, "metadata": {"spend_logs_metadata": metadata}})
    assert status == 200, body
    [spend] = await gateway.spends()
    kept = {k: v for k, v in spend.metadata.items() if v != REDACTED}
    assert kept == PLAIN
    assert set(spend.metadata) == set(metadata)


async def test_a_credential_as_a_key_or_in_a_name_value_pair_is_redacted(gateway: Gateway) -> None:
    """Review finding: nested metadata kept a token used as a dict key and the
    value of a ["X-Api-Key", value] pair."""
    token = "sk-proj-" + "A1b2C3d4" * 6
    metadata = {
        "keys_used": {token: 1, "plain": 2},
        "headers": [["X-Api-Key", "plainkey123"], ["Accept", "application/json"]],
    }
    status, body = await _chat(gateway, {**CHAT, "metadata": {"spend_logs_metadata": metadata}})
    assert status == 200, body
    [spend] = await gateway.spends()
    assert spend.metadata == {
        "keys_used": {REDACTED: 1, "plain": 2},
        "headers": [["X-Api-Key", REDACTED], ["Accept", "application/json"]],
    }
    stored = " ".join(r.data for r in await gateway.store.read_types(["SpendRecorded"], 0, 10))
    assert token not in stored
    assert "plainkey123" not in stored


@pytest.mark.parametrize(("label", "secret"), SECRET_SHAPES, ids=[label for label, _ in SECRET_SHAPES])
@pytest.mark.parametrize("where", ["tags", "metadata.tags", "header"])
async def test_a_tag_that_looks_like_a_secret_is_refused_and_not_stored(
    gateway: Gateway, label: str, secret: str, where: str
) -> None:
    tag = secret.replace(",", ";")  # the header splits on commas
    body: dict[str, Any] = {**CHAT}
    headers: dict[str, str] = {}
    if where == "tags":
        body["tags"] = ["team:search", tag]
    elif where == "metadata.tags":
        body["metadata"] = {"tags": [tag]}
    else:
        headers["x-ledger-tags"] = f"team:search,{tag}"
    status, answer = await _chat(gateway, body, headers)
    assert status == 400, (label, answer)
    assert answer["error"]["param"] == {"header": "header x-ledger-tags"}.get(where, where)
    assert tag not in str(answer)
    assert await gateway.spends() == []
    assert gateway.upstream_requests() == []


async def test_ordinary_tags_pass(gateway: Gateway) -> None:
    tags = ["team:search", "customer:acme-corporation-international", "order-2026-000123", "run:" + "f4" * 20]
    status, answer = await _chat(gateway, {**CHAT, "tags": tags})
    assert status == 200, answer
    [spend] = await gateway.spends()
    assert set(tags) <= set(spend.tags)


# ------------------------------------------------------------------ issue 11 item 8: the user-hash secret


def test_the_user_hash_secret_comes_from_a_file(tmp_path: Path) -> None:
    secret_file = tmp_path / "user_hash_secret"
    secret_file.write_text("f" * 40 + "\n")
    env = {"LEDGER_USER_HASH_SECRET_FILE": str(secret_file)}
    assert Settings.from_env(env).user_hash_secret == "f" * 40
    with pytest.raises(SettingsError, match="not both"):
        Settings.from_env({**env, "LEDGER_USER_HASH_SECRET": "g" * 40})
    with pytest.raises(SettingsError, match="cannot be read"):
        Settings.from_env({"LEDGER_USER_HASH_SECRET_FILE": str(tmp_path / "missing")})
    secret_file.write_text("short\n")
    with pytest.raises(SettingsError, match="at least 32"):
        Settings.from_env(env)
    secret_file.write_text("\n")
    with pytest.raises(SettingsError, match="empty"):
        Settings.from_env(env)


async def test_a_gateway_with_a_file_secret_hashes_with_it_and_keeps_none_in_the_database(
    settings: Settings, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    secret = "a-user-hash-secret-from-a-mounted-file"
    (tmp_path / "secret").write_text(secret)
    from_file = Settings.from_env(
        {"LEDGER_USER_HASH_SECRET_FILE": str(tmp_path / "secret")},
        database_url=settings.database_url,
        redis_url=settings.redis_url,
    )
    mock = await aiohttp_server(create_mock_app())
    provider = ProviderConfig("mock", str(mock.make_url("/v1")).rstrip("/"), price_provider="openai")
    app = gateway_app(
        msgspec.structs.replace(settings, user_hash_secret=from_file.user_hash_secret, providers=(provider,))
    )
    server = await aiohttp_server(app)
    key, _ = await app[KEY_BOOK].generate(key_alias="t", tags=["t"])
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            server.make_url("/v1/chat/completions"),
            json={**CHAT, "user": "ana@example.com"},
            headers={"Authorization": f"Bearer {key}"},
        ) as r,
    ):
        assert r.status == 200, await r.text()
    [row] = await app[STORE].read_types(["SpendRecorded"], 0, 10)
    spend = ev.decode(row)
    assert isinstance(spend, ev.SpendRecorded)
    assert spend.user_hash == hmac.new(secret.encode(), b"ana@example.com", hashlib.sha256).hexdigest()
    stored = await app[STORE].pool.fetchval("select count(*) from ledger_secrets where name = 'user_hash'")
    assert stored == 0


def _serve_log(settings: Settings, env: dict[str, str]) -> list[dict[str, Any]]:
    """The JSON log lines of `ledger serve` up to "listening", after which it is stopped."""
    assert settings.database_url is not None
    assert settings.redis_url is not None
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")},
        "LEDGER_DATABASE_URL": settings.database_url,
        "LEDGER_REDIS_URL": settings.redis_url,
        "LEDGER_PORT": "0",
        "LEDGER_ADMIN_KEY": "test-admin-key-0123456789",
        "LEDGER_RUN_PROJECTIONS": "false",
        "LEDGER_LOG_FORMAT": "json",
        **env,
    }
    lines: list[dict[str, Any]] = []
    with subprocess.Popen(
        [sys.executable, "-m", "ledger.run.cli", "serve"],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stderr is not None
            for raw in proc.stderr:
                lines.append(json.loads(raw))
                if lines[-1]["event"] == "listening":  # the warning, if any, comes before
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.communicate(timeout=30)
    return lines


async def test_serve_warns_when_the_user_hash_secret_is_in_the_database(
    settings: Settings, tmp_path: Path
) -> None:
    warned = await asyncio.to_thread(_serve_log, settings, {})
    [warning] = [line for line in warned if line.get("event") == "user_hash_secret_in_database"]
    assert warning["level"] == "warning"
    (tmp_path / "secret").write_text("s" * 40)
    quiet = await asyncio.to_thread(
        _serve_log, settings, {"LEDGER_USER_HASH_SECRET_FILE": str(tmp_path / "secret")}
    )
    assert any(line.get("event") == "listening" for line in quiet)
    assert not any(line.get("event") == "user_hash_secret_in_database" for line in quiet)
