"""A built-in OpenAI-compatible upstream for the demo, the tests and the benchmarks.

Speaks /v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models,
streams with SSE (honouring ``stream_options.include_usage``), and returns
realistic ``usage``: prompt tokens from the text (about 4 characters a token),
completion tokens deterministic per prompt and never above ``max_tokens``.

A request can ask it to misbehave with a ``mock`` object in the body, which the
gateway passes through like any unknown field::

    {"mock": {"delay_ms": 500,          # wait before the first byte
              "chunk_delay_ms": 20,     # wait between stream chunks
              "status": 500,            # answer with this error status
              "cut_after": 3,           # drop the connection after N chunks/bytes
              "no_usage": true,         # ignore stream_options.include_usage
              "malformed": true,        # 200 with a body that is not JSON
              "huge_bytes": 5000000,    # pad the answer to this size
              "completion_tokens": 40}} # exactly this many output tokens

Server-wide defaults for the same knobs come from ``MockConfig``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web

_encoder = msgspec.json.Encoder()
_WORDS = [
    *"the ledger keeps every cent of every request in order so budgets hold".split(),
    *"and bills split cleanly across teams projects customers and users".split(),
]
MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1-mini",
    "text-embedding-3-small",
    "gpt-3.5-turbo-instruct",
)


@dataclass(frozen=True, slots=True)
class MockConfig:
    delay_ms: float = 0.0
    chunk_delay_ms: float = 0.0
    fail_status: int | None = None
    api_key: str | None = None  # when set, requests must carry it
    # /mock/requests shows raw prompts and ``user`` ids: only to this bearer key,
    # and to nobody when it is unset.
    admin_key: str | None = None


REQUESTS: web.AppKey[deque[dict[str, Any]]] = web.AppKey("requests")
CONFIG = web.AppKey("config", MockConfig)
RECORD: web.RequestKey[dict[str, Any]] = web.RequestKey("record")


def _text_of(value: Any) -> str:
    """All text in a prompt / messages / input value."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        return " ".join(_text_of(v) for k, v in value.items() if k in ("content", "text"))
    return ""


def prompt_tokens_of(body: dict[str, Any]) -> int:
    if "messages" in body:
        messages = body["messages"] if isinstance(body["messages"], list) else []
        return sum(3 + math.ceil(len(_text_of(m)) / 4) for m in messages) + 3
    return max(1, math.ceil(len(_text_of(body.get("prompt", body.get("input", "")))) / 4))


def completion_tokens_of(body: dict[str, Any], mock: dict[str, Any]) -> int:
    if isinstance(mock.get("completion_tokens"), int):
        wanted = int(mock["completion_tokens"])
    else:
        digest = hashlib.sha256(_encoder.encode(body.get("messages", body.get("prompt", "")))).digest()
        wanted = 16 + digest[0] % 49  # 16..64, the same for the same prompt
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(cap, int) and cap > 0:
        wanted = min(wanted, cap)
    return max(0, wanted)


def _usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "mock_error", "param": None, "code": None}}
    return web.Response(status=status, body=_encoder.encode(body), content_type="application/json")


async def _prelude(request: web.Request) -> tuple[dict[str, Any], dict[str, Any]] | web.Response:
    config = request.app[CONFIG]
    if config.api_key and request.headers.get("Authorization") != f"Bearer {config.api_key}":
        return _error(401, "mock upstream: bad API key")
    try:
        body = msgspec.json.decode(await request.read())
    except (msgspec.DecodeError, UnicodeDecodeError):
        return _error(400, "mock upstream: body is not JSON")
    if not isinstance(body, dict):
        return _error(400, "mock upstream: body is not an object")
    record: dict[str, Any] = {
        "path": request.path,
        "headers": dict(request.headers),
        "body": body,
        "sent": [],  # stream frames, as written
    }
    request.app[REQUESTS].append(record)
    request[RECORD] = record
    raw_mock = body.get("mock")
    mock: dict[str, Any] = raw_mock if isinstance(raw_mock, dict) else {}
    delay = mock.get("delay_ms", config.delay_ms)
    if isinstance(delay, int | float) and delay > 0:
        await asyncio.sleep(delay / 1000)
    status = mock.get("status", config.fail_status)
    if isinstance(status, int) and status >= 400:
        return _error(status, f"mock upstream failing with {status} as asked")
    return body, mock


async def _plain(request: web.Request, mock: dict[str, Any], payload: dict[str, Any]) -> web.StreamResponse:
    data = _encoder.encode(payload)
    if mock.get("malformed"):
        data = b'{"id": "broken", "choices": [ this is not json'
    huge = mock.get("huge_bytes")
    if isinstance(huge, int) and huge > len(data):
        payload["padding"] = "x" * (huge - len(data))
        data = _encoder.encode(payload)
    cut = mock.get("cut_after")
    if isinstance(cut, int):
        response = web.StreamResponse(
            headers={"Content-Type": "application/json", "Content-Length": str(len(data))}
        )
        await response.prepare(request)
        await response.write(data[:cut])
        assert request.transport is not None
        request.transport.close()  # the peer sees a body shorter than announced
        return response
    return web.Response(body=data, content_type="application/json")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    got = await _prelude(request)
    if isinstance(got, web.Response):
        return got
    body, mock = got
    return await _complete(request, body, mock, chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    got = await _prelude(request)
    if isinstance(got, web.Response):
        return got
    body, mock = got
    return await _complete(request, body, mock, chat=False)


async def _complete(
    request: web.Request, body: dict[str, Any], mock: dict[str, Any], *, chat: bool
) -> web.StreamResponse:
    model = str(body.get("model", "gpt-4o-mini"))
    prompt = prompt_tokens_of(body)
    completion = completion_tokens_of(body, mock)
    words = [_WORDS[i % len(_WORDS)] for i in range(completion)]
    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    finish = "length" if isinstance(cap, int) and completion >= cap else "stop"
    ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    if not body.get("stream"):
        if chat:
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": " ".join(words), "refusal": None},
                "logprobs": None,
                "finish_reason": finish,
            }
        else:
            choice = {
                "index": 0,
                "text": " ".join(words),
                "logprobs": None,
                "finish_reason": finish,
            }
        payload = {
            "id": ident,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model,
            "choices": [choice],
            "usage": _usage(prompt, completion),
            "system_fingerprint": "fp_mock",
        }
        return await _plain(request, mock, payload)

    options = body.get("stream_options")
    # "no_usage": an upstream that ignores stream_options.include_usage
    asked = isinstance(options, dict) and options.get("include_usage") is True
    include_usage = asked and not mock.get("no_usage")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    chunk_delay = mock.get("chunk_delay_ms", request.app[CONFIG].chunk_delay_ms)
    cut = mock.get("cut_after")
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> bytes:
        obj: dict[str, Any] = {
            "id": ident,
            "object": kind,
            "created": created,
            "model": model,
            "system_fingerprint": "fp_mock",
            "choices": choices,
        }
        if include_usage:
            obj["usage"] = usage
        return b"data: " + _encoder.encode(obj) + b"\n\n"

    def piece(text: str | None, finish_reason: str | None, role: bool = False) -> dict[str, Any]:
        if chat:
            delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}

    frames = [chunk([piece(None, None, role=True)])] if chat else []
    frames += [chunk([piece((" " if i else "") + w, None)]) for i, w in enumerate(words)]
    frames.append(chunk([piece(None, finish)]))
    if include_usage:
        frames.append(chunk([], _usage(prompt, completion)))
    frames.append(b"data: [DONE]\n\n")
    for i, frame in enumerate(frames):
        if isinstance(cut, int) and i >= cut:
            assert request.transport is not None
            request.transport.close()
            return response
        await response.write(frame)
        request[RECORD]["sent"].append(frame.decode())
        if isinstance(chunk_delay, int | float) and chunk_delay > 0:
            await asyncio.sleep(chunk_delay / 1000)
    await response.write_eof()
    return response


async def embeddings(request: web.Request) -> web.StreamResponse:
    got = await _prelude(request)
    if isinstance(got, web.Response):
        return got
    body, mock = got
    inputs = body.get("input", "")
    items = inputs if isinstance(inputs, list) and inputs and not isinstance(inputs[0], int) else [inputs]
    raw_dims = body.get("dimensions")
    dims = raw_dims if isinstance(raw_dims, int) and 0 < raw_dims <= 4096 else 8
    data = []
    for index, item in enumerate(items):
        digest = hashlib.sha256(_encoder.encode(item)).digest()
        vector = [((digest[i % 32] / 255.0) - 0.5) for i in range(dims)]
        data.append({"object": "embedding", "index": index, "embedding": vector})
    prompt = max(1, math.ceil(len(_text_of(inputs)) / 4))
    payload = {
        "object": "list",
        "data": data,
        "model": str(body.get("model", "text-embedding-3-small")),
        "usage": {"prompt_tokens": prompt, "total_tokens": prompt},
    }
    return await _plain(request, mock, payload)


async def models(request: web.Request) -> web.Response:
    config = request.app[CONFIG]
    if config.api_key and request.headers.get("Authorization") != f"Bearer {config.api_key}":
        return _error(401, "mock upstream: bad API key")
    data = [{"id": m, "object": "model", "created": 1700000000, "owned_by": "mock"} for m in MODELS]
    return web.Response(
        body=_encoder.encode({"object": "list", "data": data}), content_type="application/json"
    )


async def recorded(request: web.Request) -> web.Response:
    """The last requests received (for demos and tests), to the admin key only."""
    admin_key = request.app[CONFIG].admin_key
    if admin_key is None:
        return _error(404, "mock upstream: /mock/requests is off (no admin key configured)")
    sent = request.headers.get("Authorization", "")
    given = hashlib.sha256(sent.removeprefix("Bearer ").encode()).digest()
    if not sent.startswith("Bearer ") or not hmac.compare_digest(
        given, hashlib.sha256(admin_key.encode()).digest()
    ):
        return _error(401, "mock upstream: /mock/requests needs the admin key")
    seen: deque[dict[str, Any]] = request.app[REQUESTS]
    return web.Response(body=_encoder.encode([*seen]), content_type="application/json")


def create_mock_app(config: MockConfig | None = None) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[CONFIG] = config or MockConfig()
    app[REQUESTS] = deque(maxlen=200)
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", chat_completions)
        app.router.add_post(f"{prefix}/completions", completions)
        app.router.add_post(f"{prefix}/embeddings", embeddings)
        app.router.add_get(f"{prefix}/models", models)
    app.router.add_get("/mock/requests", recorded)
    return app
