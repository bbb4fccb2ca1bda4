"""Attribution: who and what a request is for, from every source, merged and checked.

Sources: body ``metadata.tags``, top-level ``tags``, headers ``x-ledger-tags``
(comma-separated) and ``x-litellm-tags``; body ``metadata.spend_logs_metadata``
and headers ``x-ledger-spend-logs-metadata`` / ``x-litellm-spend-logs-metadata``
(JSON objects); the ``user`` field (stored as a keyed hash only); and the tags
bound to the caller's API key, which a client cannot drop. Attribution fields
are removed from the body before it goes upstream.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import msgspec

from gateway.errors import ApiError
from ledger.domain.privacy import hash_user, redact, secret_value
from ledger.subjects import TEMPLATE_SUFFIX

TAG_HEADERS = ("x-ledger-tags", "x-litellm-tags")
METADATA_HEADERS = ("x-ledger-spend-logs-metadata", "x-litellm-spend-logs-metadata")
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class Limits:
    max_tags: int = 64
    max_tag_length: int = 256
    max_metadata_bytes: int = 16 * 1024
    max_metadata_depth: int = 4  # spend_logs_metadata nesting: {"a": {"b": [..]}} is depth 3


@dataclass(frozen=True, slots=True)
class Attribution:
    tags: list[str]
    metadata: dict[str, Any]  # redacted
    user_hash: str | None


def _bad(message: str, param: str) -> ApiError:
    return ApiError(400, message, param=param, code="invalid_attribution")


def _clean_tag(tag: object, source: str, limits: Limits) -> str:
    if not isinstance(tag, str):
        raise _bad(f"{source} must be a list of strings; found {type(tag).__name__}", source)
    tag = tag.strip()
    if not tag:
        raise _bad(f"{source} contains an empty tag", source)
    if len(tag) > limits.max_tag_length:
        raise _bad(f"{source} contains a tag longer than {limits.max_tag_length} characters", source)
    for ch in tag:
        if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"):
            raise _bad(f"{source} contains a tag with the control character U+{ord(ch):04X}", source)
    if secret_value(tag):
        # Refused, not redacted: a tag is a budget's name, and "[REDACTED]" would
        # merge unrelated spend. The message does not repeat the tag.
        raise _bad(f"{source} contains a tag that looks like a credential; tags are stored as sent", source)
    # A definition named `customer:*` is a budget template; a request naming it
    # literally would be charged to one tag that every customer's budget shares.
    if tag == "*" or tag.endswith(TEMPLATE_SUFFIX):
        raise _bad(
            f"{source} contains {tag!r}: a name ending in '*' is a budget template or a key scope, "
            "not a tag; send the tag itself (e.g. 'customer:acme')",
            source,
        )
    return tag


def _tag_list(value: object, source: str, limits: Limits) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):  # LiteLLM's tag-routing docs send "a,b" as well as ["a", "b"]
        value = [p for p in value.split(",") if p.strip()]
    if not isinstance(value, list):
        raise _bad(f"{source} must be a list of strings (or one comma-separated string)", source)
    if len(value) > limits.max_tags:
        raise _bad(f"{source} has {len(value)} tags; at most {limits.max_tags} are allowed", source)
    return [_clean_tag(t, source, limits) for t in value]


def _metadata_value(value: object, where: str, source: str, depth: int, limits: Limits) -> None:
    if value is None or isinstance(value, bool | int | float):
        return
    if isinstance(value, str):
        if "\x00" in value:
            raise _bad(f"{source} contains a NUL character, which cannot be stored", source)
        return
    if isinstance(value, dict | list) and depth >= limits.max_metadata_depth:
        raise _bad(f"{source} nests deeper than {limits.max_metadata_depth} levels at {where}", source)
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str) or not key or len(key) > 256:
                raise _bad(f"{source} keys must be non-empty strings of at most 256 characters", source)
            if "\x00" in key:
                raise _bad(f"{source} contains a NUL character, which cannot be stored", source)
            _metadata_value(item, f"{where}.{key}", source, depth + 1, limits)
        return
    if isinstance(value, list):
        for i, item in enumerate(value):
            _metadata_value(item, f"{where}[{i}]", source, depth + 1, limits)
        return
    raise _bad(f"{source} at {where} holds a {type(value).__name__}, which JSON cannot carry", source)


def _metadata_object(value: object, source: str, limits: Limits) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"{source} must be a JSON object", source)
    # The size first (one C call): a body can carry millions of tiny values that
    # would each be walked below, holding the event loop for seconds.
    try:
        size = len(_encoder.encode(value))
    except (TypeError, OverflowError):
        size = limits.max_metadata_bytes + 1
    if size > limits.max_metadata_bytes:
        raise _bad(f"spend_logs_metadata is larger than {limits.max_metadata_bytes} bytes encoded", source)
    # Objects and arrays nest (LiteLLM accepts them), bounded in depth here and
    # in size once merged; every level is redacted before it is stored.
    _metadata_value(value, source.removeprefix("header "), source, 0, limits)
    return value


def attribute(
    body: dict[str, Any],
    headers: Mapping[str, str],
    key_tags: tuple[str, ...],
    limits: Limits,
    user_secret: bytes,
) -> Attribution:
    """Merge every source; strip attribution fields from ``body`` in place."""
    tags: list[str] = list(key_tags)  # the key's tags first: always applied
    metadata: dict[str, Any] = {}

    for name in TAG_HEADERS:
        raw = headers.get(name)
        if raw is not None:
            parts = [p for p in raw.split(",") if p.strip()]
            if len(parts) > limits.max_tags:
                raise _bad(
                    f"header {name} has {len(parts)} tags; at most {limits.max_tags} are allowed",
                    name,
                )
            tags += [_clean_tag(p, f"header {name}", limits) for p in parts]
    for name in METADATA_HEADERS:
        raw = headers.get(name)
        if raw is not None:
            try:
                # aiohttp keeps undecodable header bytes as surrogates: give them
                # back, and the JSON decoder refuses them as invalid UTF-8 (a 400)
                parsed = msgspec.json.decode(raw.encode("utf-8", "surrogateescape"))
            except (msgspec.DecodeError, UnicodeDecodeError):
                raise _bad(f"header {name} is not valid JSON in UTF-8", name) from None
            metadata.update(_metadata_object(parsed, f"header {name}", limits))

    meta_field = body.get("metadata")
    if meta_field is not None and not isinstance(meta_field, dict):
        raise _bad("metadata must be an object", "metadata")
    if isinstance(meta_field, dict):
        tags += _tag_list(meta_field.pop("tags", None), "metadata.tags", limits)
        metadata.update(
            _metadata_object(
                meta_field.pop("spend_logs_metadata", None), "metadata.spend_logs_metadata", limits
            )
        )
        if not meta_field:
            del body["metadata"]  # nothing left for the upstream
    tags += _tag_list(body.pop("tags", None), "tags", limits)

    merged = list(dict.fromkeys(tags))
    if len(merged) > limits.max_tags:
        raise _bad(f"{len(merged)} tags in all; at most {limits.max_tags} are allowed", "tags")
    metadata = redact(metadata)
    if len(_encoder.encode(metadata)) > limits.max_metadata_bytes:
        raise _bad(
            f"spend_logs_metadata is larger than {limits.max_metadata_bytes} bytes encoded",
            "metadata.spend_logs_metadata",
        )

    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise _bad("user must be a string", "user")
    user_hash = hash_user(user, user_secret) if user else None
    return Attribution(merged, metadata, user_hash)
