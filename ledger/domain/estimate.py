"""Upper bounds for what a request can cost, before it is sent.

The prompt bound counts UTF-8 bytes of every text the model reads (a token is
at least one byte) plus a per-message allowance; images count a configured
bound each; tool definitions and response formats count as prompt.

The output bound is the request's output cap times the number of completions
the upstream generates (``n``; for legacy completions ``max(n, best_of)`` per
prompt of a prompt list). When the client set no cap and a budget applies, the
gateway forwards one (``max_completion_tokens``, or ``max_tokens`` for legacy
completions), so the upstream can never produce more than was reserved.

Caps and counts are validated here: a value the bound cannot trust (a float, a
negative number, an absurd size) is a :class:`BoundError` naming the field
rather than a guess. Numeric strings are accepted and forwarded as integers, so
the upstream reads the same number the bound used.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec

_encoder = msgspec.json.Encoder()
_PER_MESSAGE = 8
_BASE = 16
# Largest output cap the bound accepts: far above any model's context, far
# below what could overflow a counter (see ledger/domain/money.py).
MAX_OUTPUT_CAP = 10_000_000
MAX_CHOICES = 128  # OpenAI's limit for n and best_of
MAX_PROMPTS = 2048  # legacy completions: prompts in one list

# OpenAI's documented image costs, at the dearest detail ("high"): the image is
# scaled into 2048x2048, its short side down to 768 px, and counted in 512 px
# tiles, at most 2 x 4 = 8 of them (base + 8 x per tile); models that count 32 px
# patches read at most 1536, times a per-model multiplier. gpt-4o-mini counts
# ~33x the tokens of gpt-4o for the same image (at a 1/33 price). Longest prefix
# first; other models use the configured bound.
_IMAGE_TOKENS = (
    ("gpt-4o-mini", 2833 + 8 * 5667),
    ("gpt-4.1-nano", math.ceil(1536 * 2.46)),
    ("gpt-4.1-mini", math.ceil(1536 * 1.62)),
    ("o4-mini", math.ceil(1536 * 1.72)),
    ("computer-use-preview", 65 + 8 * 129),
    ("gpt-4o", 85 + 8 * 170),
    ("chatgpt-4o", 85 + 8 * 170),
    ("gpt-4.1", 85 + 8 * 170),
    ("gpt-4.5", 85 + 8 * 170),
    ("gpt-4-turbo", 85 + 8 * 170),
    ("o1", 75 + 8 * 150),
    ("o3", 75 + 8 * 150),
)
# A PDF is read as the text and an image of each page, at most 100 pages
# (OpenAI's limit): its bytes alone do not bound it.
_FILE_PAGES = 100


def image_token_bound(model: object, configured: int) -> int:
    """The most one image part can cost ``model``: its documented maximum, or the
    configured bound when that is larger or the model is not listed."""
    name = model.rsplit("/", 1)[-1].lower() if isinstance(model, str) else ""
    for prefix, tokens in _IMAGE_TOKENS:
        if name.startswith(prefix):
            return max(configured, tokens)
    return configured


CHAT = "chat"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"


class BoundError(ValueError):
    """A request field the cost bound cannot trust; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


@dataclass(frozen=True, slots=True)
class Bound:
    """The most a request can consume: prompt and completion tokens.

    ``inject`` is the output cap to forward when the client set none
    (``(field, value)``), or None when the client's own cap is the bound.
    """

    prompt: int
    completion: int
    inject: tuple[str, int] | None = None


def _text_bytes(value: Any, image_tokens: int, file_tokens: int = 0) -> int:
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, list):
        if value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return len(value)  # pre-tokenized input: one token each
        return sum(_text_bytes(v, image_tokens, file_tokens) for v in value)
    if isinstance(value, dict):
        kind = value.get("type")
        if kind in ("image_url", "input_image", "image"):
            return image_tokens
        if kind in ("file", "input_file"):
            inner = value.get("file", value)
            data = inner.get("file_data") if isinstance(inner, dict) else None
            # Inline data: its bytes (a document has fewer tokens of text than bytes).
            # A file sent by id has no size here: the configured bound per file.
            # Either way, plus an image of each page.
            text = len(data.encode()) if isinstance(data, str) else file_tokens
            return text + _FILE_PAGES * image_tokens
        return sum(_text_bytes(v, image_tokens, file_tokens) for k, v in value.items() if k != "type")
    return 0


def prompt_bound(body: dict[str, Any], image_tokens: int = 2000, file_tokens: int = 200_000) -> int:
    total = _BASE
    messages = body.get("messages")
    if isinstance(messages, list):
        total += sum(_PER_MESSAGE + _text_bytes(m, image_tokens, file_tokens) for m in messages)
    for field in ("prompt", "input", "suffix"):
        if field in body:
            total += _text_bytes(body[field], image_tokens, file_tokens)
    for field in ("tools", "functions", "response_format"):
        if body.get(field) is not None:
            total += len(_encoder.encode(body[field]))
    return total


def prompt_guess(body: dict[str, Any]) -> int:
    """A realistic prompt size (about 4 bytes a token), for charging a stream that
    was cut before the upstream reported usage."""
    return max(1, math.ceil(prompt_bound(body, 85) / 4))


def _whole(body: dict[str, Any], field: str, low: int, high: int) -> int | None:
    """A positive whole number field (int or numeric string), normalised to int in
    ``body``; None when absent or null."""
    value = body.get(field)
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
        body[field] = value  # forward exactly what the bound used
    if not isinstance(value, int) or isinstance(value, bool):
        raise BoundError(field, f"must be a whole number from {low} to {high}")
    if not low <= value <= high:
        raise BoundError(field, f"must be from {low} to {high}, got {value}")
    return value


def _prompt_count(body: dict[str, Any]) -> int:
    """Prompts in a legacy completions request: a list of strings or of token
    lists is one prompt each; anything else is one."""
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        return 1
    if all(isinstance(p, list) for p in prompt) or all(isinstance(p, str) for p in prompt):
        if len(prompt) > MAX_PROMPTS:
            raise BoundError("prompt", f"may list at most {MAX_PROMPTS} prompts")
        return len(prompt)
    return 1


def request_bound(
    kind: str, body: dict[str, Any], *, default_cap: int, image_tokens: int, file_tokens: int = 200_000
) -> Bound:
    """The upper bound of one request. May normalise numeric strings in ``body``."""
    image_tokens = image_token_bound(body.get("model"), image_tokens)
    prompt = prompt_bound(body, image_tokens, file_tokens)
    if kind == EMBEDDINGS:
        return Bound(prompt, 0)
    if kind == CHAT:
        caps = [_whole(body, f, 1, MAX_OUTPUT_CAP) for f in ("max_completion_tokens", "max_tokens")]
        given = [c for c in caps if c is not None]
        n = _whole(body, "n", 1, MAX_CHOICES) or 1
        choices = n
        inject_field = "max_completion_tokens"
        # Predicted outputs: rejected prediction tokens are billed as output.
        extra = 0
        prediction = body.get("prediction")
        if isinstance(prediction, dict):
            extra = _text_bytes(prediction.get("content"), 0) * n
    else:
        given = [c for c in [_whole(body, "max_tokens", 1, MAX_OUTPUT_CAP)] if c is not None]
        n = _whole(body, "n", 1, MAX_CHOICES) or 1
        best_of = _whole(body, "best_of", 1, MAX_CHOICES) or 1
        choices = max(n, best_of) * _prompt_count(body)
        inject_field = "max_tokens"
        extra = 0
    # Both caps given: the upstream honours one of them; bound by the larger.
    cap = max(given) if given else default_cap
    inject = None if given else (inject_field, default_cap)
    return Bound(prompt, cap * choices + extra, inject)
