"""Privacy: end-user ids become keyed hashes; secret-looking metadata is redacted;
secret-looking tags are refused (by the gateway, with this module's test).

All of it happens before anything is stored or logged.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
from collections import Counter
from typing import Any

from detect_secrets.plugins.artifactory import ArtifactoryDetector
from detect_secrets.plugins.aws import AWSKeyDetector
from detect_secrets.plugins.azure_storage_key import AzureStorageKeyDetector
from detect_secrets.plugins.base import RegexBasedDetector
from detect_secrets.plugins.basic_auth import BasicAuthDetector
from detect_secrets.plugins.cloudant import CloudantDetector
from detect_secrets.plugins.discord import DiscordBotTokenDetector
from detect_secrets.plugins.github_token import GitHubTokenDetector
from detect_secrets.plugins.gitlab_token import GitLabTokenDetector
from detect_secrets.plugins.high_entropy_strings import Base64HighEntropyString
from detect_secrets.plugins.ibm_cloud_iam import IbmCloudIamDetector
from detect_secrets.plugins.ibm_cos_hmac import IbmCosHmacDetector
from detect_secrets.plugins.jwt import JwtTokenDetector
from detect_secrets.plugins.mailchimp import MailchimpDetector
from detect_secrets.plugins.npm import NpmDetector
from detect_secrets.plugins.openai import OpenAIDetector
from detect_secrets.plugins.private_key import PrivateKeyDetector
from detect_secrets.plugins.pypi_token import PypiTokenDetector
from detect_secrets.plugins.sendgrid import SendGridDetector
from detect_secrets.plugins.slack import SlackDetector
from detect_secrets.plugins.softlayer import SoftlayerDetector
from detect_secrets.plugins.square_oauth import SquareOAuthDetector
from detect_secrets.plugins.stripe import StripeDetector
from detect_secrets.plugins.telegram_token import TelegramBotTokenDetector
from detect_secrets.plugins.twilio import TwilioKeyDetector

REDACTED = "[REDACTED]"

# Key names whose values are credentials, whatever the value looks like. Matched
# case-insensitively on the name with its separators removed, so passWord,
# dbpassword, secretkey, privatekey and openai_key all count. Counts of tokens
# (max_tokens, tokenizer) and "author" stay readable; names ending in "key"
# are redacted even when harmless (monkey): a lost label costs less than a leak.
_SECRET_NAME_RE = re.compile(
    r"pass(?!eng|age)|pwd|secret|auth(?!or(?!i[sz]))|credential|cookie|bearer|signature"
    r"|token(?!s|i[sz])|keys?$|(api|private|access|secret|account)key|sessionid"
)
_SEPARATORS_RE = re.compile(r"[^a-z0-9]")

# Values that are credentials, whatever the key says: detect-secrets' shape rules
# (AWS, Azure, GitHub, GitLab, Slack, Stripe, JWT, basic-auth URLs, private keys
# and more), plus shapes it does not know.
_DETECTORS: tuple[RegexBasedDetector, ...] = (
    ArtifactoryDetector(),
    AWSKeyDetector(),
    AzureStorageKeyDetector(),
    BasicAuthDetector(),
    CloudantDetector(),
    DiscordBotTokenDetector(),
    GitHubTokenDetector(),
    GitLabTokenDetector(),
    IbmCloudIamDetector(),
    IbmCosHmacDetector(),
    JwtTokenDetector(),
    MailchimpDetector(),
    NpmDetector(),
    OpenAIDetector(),
    PrivateKeyDetector(),
    PypiTokenDetector(),
    SendGridDetector(),
    SlackDetector(),
    SoftlayerDetector(),
    SquareOAuthDetector(),
    StripeDetector(),
    TelegramBotTokenDetector(),
    TwilioKeyDetector(),
)
# Case-sensitive but for the two header words: IGNORECASE over the whole
# alternation made it ten times slower.
_OWN_RE = re.compile(
    r"(?i:bearer|basic)\s+[A-Za-z0-9._~+/=-]{6,}"  # Authorization header values, also inside text
    r"|sk-[A-Za-z0-9_-]{8,}"  # OpenAI / Anthropic / ledger keys
    r"|[rs]k_(?:live|test)_[A-Za-z0-9]{8,}"  # Stripe, test keys and short ones too
    r"|gh[pousr]_[A-Za-z0-9]{20,}"  # GitHub, any length
    r"|github_pat_[A-Za-z0-9_]{20,}"  # GitHub fine-grained tokens
    r"|hf_[A-Za-z0-9]{20,}"  # Hugging Face
    r"|ya29\.[A-Za-z0-9_-]{20,}"  # Google OAuth access tokens
    r"|AIza[0-9A-Za-z_-]{30,}"  # Google API keys
    r"|xox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|AccountKey=[^;\s]{16,}"  # Azure connection strings, any key length
    r"|SharedAccessSignature=[^;\s]{16,}"  # Azure SAS
    r"|-----BEGIN [A-Z ]*PRIVATE KEY-----"
)
# Random-looking runs (an AWS secret key, a bare API key) by detect-secrets'
# entropy measure and limit; hex is left alone (ids, hashes) as its entropy is low.
_RUN_RE = re.compile(r"[A-Za-z0-9+/_=-]{32,}")
_ENTROPY_LIMIT = Base64HighEntropyString().entropy_limit
# Shorter strings cannot hold any of the shapes above: the hot path skips them.
_MIN_SECRET_LENGTH = 8
# The detectors cost ~25 us a string, so they run only on a string of plausible
# shape: a header word, a known prefix, a URL with credentials, a PEM block, or a run of 10+
# key characters with a digit or a capital (every shape above has one; a
# lowercase word like "international" does not).
_KEYWORDS_RE = re.compile(
    r"(?i:bearer|basic)\s|://|BEGIN|PuTTY|sk-|[rs]k_|gh[pousr]_|github_pat_|gl[a-z]+-|hf_|ya29\.|xox|AccountKey="
)
_RUN10_RE = re.compile(r"[A-Za-z0-9+/=_.~-]{10,}")
_DIGIT_OR_CAPITAL_RE = re.compile(r"[0-9A-Z]")


def secret_key(key: str) -> bool:
    return bool(_SECRET_NAME_RE.search(_SEPARATORS_RE.sub("", key.lower())))


def _random_run(run: str) -> bool:
    """detect-secrets' Shannon entropy (its loop over the charset is 40 us a call)."""
    n = len(run)
    entropy = -sum(c / n * math.log2(c / n) for c in Counter(run).values())
    return entropy >= _ENTROPY_LIMIT


def _plausible(value: str) -> bool:
    if len(value) < _MIN_SECRET_LENGTH:
        return False
    if _KEYWORDS_RE.search(value):
        return True
    return any(_DIGIT_OR_CAPITAL_RE.search(run) for run in _RUN10_RE.findall(value))


def secret_value(value: str) -> bool:
    if not _plausible(value):
        return False
    if _OWN_RE.search(value) or any(_random_run(m) for m in _RUN_RE.findall(value)):
        return True
    return any(p.search(value) for d in _DETECTORS for p in d.denylist)


def redact(metadata: dict[str, Any]) -> dict[str, Any]:
    """A copy with every secret-looking key's value and secret-looking value
    replaced, at every level of nesting. A key that is itself a credential (a
    token used as a dict key) is replaced too, numbered so keys stay distinct."""
    out: dict[str, Any] = {}
    hidden = 0
    for key, value in metadata.items():
        if secret_value(key):
            hidden += 1
            key = REDACTED if hidden == 1 else f"{REDACTED}#{hidden}"
            out[key] = _redact_value(value)
            continue
        out[key] = REDACTED if secret_key(key) else _redact_value(value)
    return out


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return REDACTED if secret_value(value) else value
    if isinstance(value, dict):
        return redact(value)
    if isinstance(value, list):
        # a [name, value] pair whose name says credential (headers as pairs)
        if len(value) == 2 and isinstance(value[0], str) and secret_key(value[0]):
            return [value[0], REDACTED]
        return [_redact_value(v) for v in value]
    return value


def redact_text(text: str) -> str:
    """Mask credentials inside free text (log messages, error bodies)."""
    if not _plausible(text):
        return text
    text = _OWN_RE.sub(REDACTED, text)
    for d in _DETECTORS:
        for p in d.denylist:
            text = p.sub(REDACTED, text)
    return _RUN_RE.sub(lambda m: REDACTED if _random_run(m.group()) else m.group(), text)


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
