"""Upper bounds for what a request can cost, before it is sent.

The prompt bound counts UTF-8 bytes of every text the model reads (a token is
at least one byte) plus a per-message allowance; images count a configured
bound each; tool definitions count as prompt. The output bound is the
request's ``max_completion_tokens`` / ``max_tokens`` (or a configured cap),
times ``n``. Reserving the bound and settling at the actual cost means a budget
is never overshot by a request whose output respected its limit.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
_PER_MESSAGE = 8
_BASE = 16


def _text_bytes(value: Any, image_tokens: int) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        if value and all(isinstance(v, int) for v in value):
            return len(value)  # pre-tokenized input: one token each
        return sum(_text_bytes(v, image_tokens) for v in value)
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image_url", "input_image", "image"):
            return image_tokens
        return sum(_text_bytes(v, image_tokens) for k, v in value.items() if k != "type")
    return 0


def prompt_bound(body: dict[str, Any], image_tokens: int = 2000) -> int:
    total = _BASE
    messages = body.get("messages")
    if isinstance(messages, list):
        total += sum(_PER_MESSAGE + _text_bytes(m, image_tokens) for m in messages)
    for field in ("prompt", "input", "suffix"):
        if field in body:
            total += _text_bytes(body[field], image_tokens)
    for field in ("tools", "functions", "response_format"):
        if body.get(field) is not None:
            total += len(_encoder.encode(body[field]))
    return total


def prompt_guess(body: dict[str, Any]) -> int:
    """A realistic prompt size (about 4 bytes a token), for charging a stream that
    was cut before the upstream reported usage."""
    return max(1, math.ceil(prompt_bound(body, 85) / 4))


def output_bound(body: dict[str, Any], default_cap: int) -> int:
    cap = body.get("max_completion_tokens")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
        cap = body.get("max_tokens")
    if not isinstance(cap, int) or isinstance(cap, bool) or cap <= 0:
        cap = default_cap
    n = body.get("n")
    choices = n if isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 128 else 1
    return cap * choices
