"""Counting tokens the upstream did not report: a stream cut before its usage
chunk, an upstream that ignores ``stream_options.include_usage``, a client that
left mid-stream. What was produced is charged, never nothing.

Where the model is one OpenAI's tokenizers know, the text is counted with them
(bpe-openai: tiktoken's vocabularies, bundled, so it works offline — tiktoken
itself downloads them at run time). Otherwise, or for parts that are not text,
a token is counted per UTF-8 byte: an upper bound (a token is at least a byte).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from ledger.domain.estimate import prompt_bound

with warnings.catch_warnings():
    # bpe-openai 0.1 loads its vocabularies with a deprecated importlib call
    warnings.simplefilter("ignore", DeprecationWarning)
    import bpe_openai

_PER_MESSAGE = 4  # role and separators, as OpenAI's chat format adds them
_BASE = 3


@dataclass(frozen=True, slots=True)
class Counted:
    prompt: int
    completion: int
    source: str  # "tokenizer" or "bytes" (an upper bound)


@lru_cache(maxsize=64)
def _encoding(model: str) -> Any:
    """The tokenizer for ``model`` (a bare or provider-prefixed name), or None."""
    name = model.rpartition("/")[2]
    try:
        with warnings.catch_warnings():
            # bpe-openai 0.1 loads its vocabularies with a deprecated importlib call
            warnings.simplefilter("ignore", DeprecationWarning)
            return bpe_openai.encoding_for_model(name)
    except Exception:  # unknown model: no tokenizer, bytes instead
        return None


def _texts(value: Any) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v)
    elif isinstance(value, dict):
        for k, v in value.items():
            if k not in ("type", "role", "image_url", "input_image"):
                yield from _texts(v)


def _count(encoding: Any, texts: Iterable[str]) -> int:
    return sum(len(encoding.encode(t)) for t in texts if t)


def count(model: str, body: dict[str, Any], produced: list[str], chunks: int, image_tokens: int) -> Counted:
    """Tokens of a request whose upstream reported no usage: its prompt and what
    it produced (``produced``: the text of every streamed delta; ``chunks``: how
    many content chunks carried it — each carries at least one token)."""
    encoding = _encoding(model)
    if encoding is None:
        completion = sum(len(t.encode()) for t in produced)
        return Counted(prompt_bound(body, image_tokens), max(completion, chunks), "bytes")
    prompt = _BASE
    messages = body.get("messages")
    if isinstance(messages, list):
        prompt += sum(_PER_MESSAGE + _count(encoding, _texts(m)) for m in messages)
    for field in ("prompt", "input", "suffix"):
        if field in body:
            prompt += _count(encoding, _texts(body[field]))
    images = prompt_bound({"messages": messages}, image_tokens) - prompt_bound({"messages": messages}, 0)
    prompt += images  # images are not text: their configured bound each
    for field in ("tools", "functions", "response_format"):
        if body.get(field) is not None:
            prompt += _count(encoding, _texts(body[field]))
    completion = _count(encoding, produced)
    return Counted(prompt, max(completion, chunks), "tokenizer")


def delta_texts(choices: Any) -> Iterable[str]:
    """The text a streamed chunk's choices carry (content, reasoning, refusals,
    tool call arguments, legacy completion text)."""
    if not isinstance(choices, list):
        return
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        text = choice.get("text")
        if isinstance(text, str):
            yield text
        delta = choice.get("delta")
        if isinstance(delta, dict):
            for field in ("content", "reasoning_content", "reasoning", "refusal"):
                value = delta.get(field)
                if isinstance(value, str):
                    yield value
            calls = delta.get("tool_calls")
            if isinstance(calls, list):
                for call in calls:
                    fn = call.get("function") if isinstance(call, dict) else None
                    if isinstance(fn, dict):
                        for part in ("name", "arguments"):
                            if isinstance(fn.get(part), str):
                                yield fn[part]
