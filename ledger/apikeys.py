"""Client API keys: generated once, stored only as a hash (as events), cached in memory.

A key is shown once, at generation. The log holds its SHA-256, a short
non-secret prefix for people to recognise it, the tags it always applies, the
models it may use, an alias and metadata. Every gateway process keeps the live
keys in memory and refreshes them on NOTIFY, like the budget definitions.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
import structlog

from ledger.errors import ConcurrencyError, LedgerError
from ledger.events import tagged, to_new
from ledger.follow import FollowedCache
from ledger.store import EventStore, RecordedEvent

log = structlog.get_logger(__name__)

KEY_PREFIX = "sk-ledger-"


class KeyGenerated(msgspec.Struct, frozen=True, tag=True):
    key_hash: str
    key_prefix: str  # first characters, safe to show
    at: datetime
    key_alias: str | None = None
    tags: list[str] = []
    allowed_models: list[str] | None = None
    metadata: dict[str, Any] = {}
    request_id: str | None = None


class KeyDeleted(msgspec.Struct, frozen=True, tag=True):
    key_hash: str
    at: datetime
    request_id: str | None = None


KeyEvent = KeyGenerated | KeyDeleted
KEY_EVENT_TYPES = ("KeyGenerated", "KeyDeleted")
_decoder: msgspec.json.Decoder[KeyEvent] = msgspec.json.Decoder(KeyEvent)


class KeyError_(LedgerError):
    status = 400

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class KeyNotFound(KeyError_):
    status = 404


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _decode(recorded: RecordedEvent) -> KeyEvent:
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

    def may_use(self, model: str) -> bool:
        return self.allowed_models is None or model in self.allowed_models


class KeyBook(FollowedCache):
    """Live API keys by hash, loaded from the log and kept fresh."""

    types = KEY_EVENT_TYPES

    def __init__(
        self,
        store: EventStore,
        *,
        poll_interval_s: float = 1.0,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        super().__init__(store, poll_interval_s=poll_interval_s)
        self.keys: dict[str, ApiKey] = {}
        self.now = clock or (lambda: datetime.now(UTC))

    def apply(self, recorded: RecordedEvent) -> None:
        event = _decode(recorded)
        if isinstance(event, KeyGenerated):
            self.keys[event.key_hash] = ApiKey(
                key_hash=event.key_hash,
                key_prefix=event.key_prefix,
                created_at=event.at,
                key_alias=event.key_alias,
                tags=tuple(event.tags),
                allowed_models=tuple(event.allowed_models) if event.allowed_models is not None else None,
                metadata=dict(event.metadata),
            )
        else:
            self.keys.pop(event.key_hash, None)

    def authenticate(self, secret: str) -> ApiKey | None:
        return self.keys.get(hash_key(secret))

    def find(self, key_or_hash: str) -> ApiKey | None:
        """By the secret itself, or by its hash (what /key/list shows)."""
        return self.keys.get(key_or_hash) or self.keys.get(hash_key(key_or_hash))

    async def generate(
        self,
        *,
        key_alias: str | None = None,
        tags: list[str] | None = None,
        allowed_models: list[str] | None = None,
        metadata: dict[str, Any] | None = None,
        request_id: str | None = None,
    ) -> tuple[str, ApiKey]:
        """A new key: (the secret, shown only now; its record)."""
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        event = KeyGenerated(
            key_hash=hash_key(secret),
            key_prefix=secret[: len(KEY_PREFIX) + 4],
            at=self.now(),
            key_alias=key_alias,
            tags=list(dict.fromkeys(tags or [])),
            allowed_models=sorted(set(allowed_models)) if allowed_models is not None else None,
            metadata=metadata or {},
            request_id=request_id,
        )
        await self.store.append(f"key:{event.key_hash}", 0, [to_new(event)])
        await self.refresh()
        return secret, self.keys[event.key_hash]

    async def delete(self, key_or_hash: str, *, request_id: str | None = None) -> ApiKey:
        key = self.find(key_or_hash)
        if key is None:
            await self.refresh()
            key = self.find(key_or_hash)
        if key is None:
            raise KeyNotFound("no such key", "key")
        stream = f"key:{key.key_hash}"
        try:
            await self.store.append(stream, 1, [to_new(KeyDeleted(key.key_hash, self.now(), request_id))])
        except ConcurrencyError:
            raise KeyNotFound("no such key (already deleted)", "key") from None
        await self.refresh()
        return key
