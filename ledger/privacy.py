"""Privacy: end-user ids become keyed hashes; secret-looking metadata is redacted.

Both happen before anything is stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import re
from typing import Any

REDACTED = "[REDACTED]"

# Keys whose values are credentials, whatever the value looks like: matched on
# the key's words (api_key, apiKey, X-Auth-Token, ...), so "tokenizer" or
# "max_tokens" stay readable.
_SECRET_WORDS = frozenset(
    {
        "token",
        "password",
        "passwd",
        "pwd",
        "secret",
        "apikey",
        "authorization",
        "auth",
        "cookie",
        "credential",
        "credentials",
        "bearer",
        "passphrase",
        "signature",
    }
)
_SECRET_PAIRS = frozenset(
    {("api", "key"), ("private", "key"), ("access", "key"), ("session", "id"), ("secret", "key")}
)
_WORD_RE = re.compile(r"[A-Z]?[a-z0-9]+|[A-Z]+(?![a-z])")
# Values that are credentials, whatever the key says.
_SECRET_VALUE_RE = re.compile(
    r"(^\s*bearer\s+\S"  # an Authorization header value
    r"|\bsk-[A-Za-z0-9_-]{8,}"  # OpenAI / Anthropic / ledger keys
    r"|\bsk_(live|test)_[A-Za-z0-9]{8,}"  # Stripe
    r"|\bgh[pousr]_[A-Za-z0-9]{20,}"  # GitHub
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAKIA[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bAIza[0-9A-Za-z_-]{30,}"  # Google API key
    r"|\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\."  # a JWT
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----)",
    re.IGNORECASE,
)


def secret_key(key: str) -> bool:
    words = [w.lower() for w in _WORD_RE.findall(key)]
    if any(w in _SECRET_WORDS for w in words):
        return True
    return any(pair in _SECRET_PAIRS for pair in itertools.pairwise(words))


def secret_value(value: str) -> bool:
    return bool(_SECRET_VALUE_RE.search(value))


def redact(metadata: dict[str, Any]) -> dict[str, Any]:
    """A copy with every secret-looking key's value and secret-looking value
    replaced, at every level of nesting."""
    out: dict[str, Any] = {}
    for key, value in metadata.items():
        out[key] = REDACTED if secret_key(key) else _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return REDACTED if secret_value(value) else value
    if isinstance(value, dict):
        return redact(value)
    if isinstance(value, list):
        return [_redact_value(v) for v in value]
    return value


def redact_text(text: str) -> str:
    """Mask credentials inside free text (log messages, error bodies)."""
    return _SECRET_VALUE_RE.sub(REDACTED, text)


def hash_user(user: str, secret: bytes) -> str:
    """The keyed hash (HMAC-SHA256) under which an end user is stored."""
    return hmac.new(secret, user.encode(), hashlib.sha256).hexdigest()


async def stored_secret(pool: Any, name: str) -> bytes:
    """A 32-byte secret kept in the database, created by whichever process asks first."""
    import secrets

    await pool.execute(
        "insert into ledger_secrets (name, value) values ($1, $2) on conflict (name) do nothing",
        name,
        secrets.token_bytes(32),
    )
    value = await pool.fetchval("select value from ledger_secrets where name = $1", name)
    return bytes(value)
