"""The OpenAI-compatible proxy: attribute, price, admit, forward, record, settle.

Routes: /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models and
the same without /v1. A request is:

1. authenticated (client key; the key's tags always apply), read (bounded),
   attributed (tags, metadata, hashed user; attribution fields stripped);
2. routed to its provider, checked against the key's and the tags' model lists;
3. estimated (an upper bound) and admitted: one Redis call reserves the
   estimate on every budgeted tag, ``RequestAdmitted`` is made durable, or the
   client gets a 429 ``budget_exceeded`` naming the tag;
4. forwarded; streams pass through chunk by chunk;
5. recorded: ``SpendRecorded`` is committed before the client's response is
   finished, then the counters are settled. Upstream failures release the
   reservation and are recorded as ``RequestReleased`` with their status.

A request cancelled mid-way (server shutdown) leaves its reservation to the
sweeper, which charges the estimate unless a terminal event exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import msgspec
import structlog
from aiohttp import web

from gateway import sse
from gateway.appkeys import (
    ADMISSION,
    API_KEY,
    GATE,
    METRICS,
    PRICES,
    REQUEST_ID,
    SETTINGS,
    UPSTREAMS,
    USER_SECRET,
)
from gateway.attribution import Attribution, Limits, attribute
from gateway.auth import client
from gateway.errors import ApiError, error_response
from gateway.upstreams import Upstream
from ledger.admission import Admitted, BudgetExceeded, DuplicateRequest, RateLimited, Recorded
from ledger.counters.limits import SETTING, UNIT
from ledger.domain.estimate import Bound
from ledger.domain.pricing import Price, PriceBook, Tokens
from ledger.domain.tokens import count as count_tokens
from ledger.domain.tokens import delta_texts
from ledger.errors import StoreUnavailable
from ledger.gate import Ask, Blocked
from ledger.subjects import describe

log = structlog.get_logger("gateway.proxy")
# Token counts beyond this are not usage but an upstream fault: clamped (and flagged).
MAX_RECORDED_TOKENS = 10**12
MAX_MODEL_LENGTH = 256
routes = web.RouteTableDef()

_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder()


class _Answer(msgspec.Struct):
    usage: Any = None


_answer_decoder = msgspec.json.Decoder(_Answer)
# Upstream response headers worth passing on; everything else is ours or hop-by-hop.
_PASS_HEADERS = (
    "openai-processing-ms",
    "openai-version",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
)


class _Kind:
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


_PATHS = {
    _Kind.CHAT: "/chat/completions",
    _Kind.COMPLETIONS: "/completions",
    _Kind.EMBEDDINGS: "/embeddings",
}


@dataclass(slots=True)
class _Call:
    """Everything known about one proxied request."""

    kind: str
    request_id: str
    model: str  # as the client named it
    upstream: Upstream
    upstream_model: str
    attribution: Attribution
    price: Price | None
    body: dict[str, Any]
    admitted: Admitted
    started: float
    bound: Bound


def _upstream_body(body: dict[str, Any]) -> bytes | io.BytesIO:
    """The body to forward. Over 1 MiB as a stream: aiohttp warns that raw bytes
    that large may hold the event loop (the header names it application/json)."""
    raw = _encoder.encode(body)
    return io.BytesIO(raw) if len(raw) > 1024 * 1024 else raw


# ------------------------------------------------------------------ routes


@routes.post("/v1/chat/completions")
@routes.post("/chat/completions")
@client
async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _relay(request, _Kind.CHAT)


@routes.post("/v1/completions")
@routes.post("/completions")
@client
async def completions(request: web.Request) -> web.StreamResponse:
    return await _relay(request, _Kind.COMPLETIONS)


@routes.post("/v1/embeddings")
@routes.post("/embeddings")
@client
async def embeddings(request: web.Request) -> web.StreamResponse:
    return await _relay(request, _Kind.EMBEDDINGS)


@routes.get("/v1/models")
@routes.get("/models")
@client
async def models(request: web.Request) -> web.Response:
    """The default provider's model list, plus provider-prefixed names of the others."""
    ups = request.app[UPSTREAMS]
    if ups.default is None:
        raise ApiError(503, "no upstream provider is configured", type="service_unavailable")
    upstream = ups.default
    try:
        async with upstream.session.get(
            upstream.url("/models"), headers=_upstream_headers(upstream, None)
        ) as resp:
            data = await _read_limited(resp, request.app[SETTINGS].max_response_bytes)
            status = resp.status
    except (aiohttp.ClientError, TimeoutError, _TooLarge) as e:
        raise ApiError(
            502,
            f"upstream {upstream.name} did not answer: {type(e).__name__}",
            type="upstream_error",
            code="upstream_unreachable",
        ) from None
    if status in (401, 403):
        # The upstream refused the gateway's own credentials: never pass its body on.
        raise ApiError(
            502,
            f"upstream {upstream.name} refused the gateway's credentials ({status})",
            type="upstream_error",
            code="upstream_auth",
        )
    if status == 200:
        data = _with_prices(data, upstream, request.app[PRICES])
    return web.Response(status=status, body=data, content_type="application/json")


def _with_prices(data: bytes, upstream: Upstream, prices: PriceBook) -> bytes:
    """Say which listed models have a price, and what it is (per token, as decimal
    strings, the way OpenRouter's model list does), so a client knows before it
    asks which models a budget can be enforced on."""
    try:
        listing = _decoder.decode(data)
        models = listing["data"]
    except (msgspec.DecodeError, UnicodeDecodeError, TypeError, KeyError):
        return data
    if not isinstance(models, list):
        return data
    for item in models:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str):
            continue
        price = prices.lookup(upstream.price_provider, item["id"][:MAX_MODEL_LENGTH])
        item["priced"] = price is not None
        if price is not None and price.input_per_mtok is not None and price.output_per_mtok is not None:
            item["pricing"] = {
                "prompt": str(price.input_per_mtok / 1_000_000),
                "completion": str(price.output_per_mtok / 1_000_000),
            }
    return _encoder.encode(listing)


# ------------------------------------------------------------------ admission


async def _read_body(request: web.Request, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(
            413,
            f"request body too large: at most {limit} bytes",
            param="body",
            code="request_too_large",
        )
    body = bytearray()
    async for chunk in request.content.iter_chunked(1 << 16):
        body += chunk
        if len(body) > limit:
            raise ApiError(
                413,
                f"request body too large: at most {limit} bytes",
                param="body",
                code="request_too_large",
            )
    return bytes(body)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = _decoder.decode(raw)
    except msgspec.DecodeError as e:
        raise ApiError(400, f"request body is not valid JSON: {e}", param="body") from None
    except UnicodeDecodeError:
        raise ApiError(400, "request body is not valid UTF-8", param="body") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", param="body") from None
    if not isinstance(body, dict):
        raise ApiError(400, "request body must be a JSON object", param="body")
    return body


def _scoped_request_id(request: web.Request, key: Any) -> str:
    """Request ids a client chooses (x-request-id) are its key's own: the same id
    under two keys is two requests, and a duplicate is only detected, and only
    reported, within one key. Ids the gateway makes are unique anyway."""
    request_id: str = request[REQUEST_ID]
    if request.headers.get("x-request-id") != request_id:
        return request_id
    scoped = f"{key.key_hash[:12] if key is not None else 'admin'}:{request_id}"
    request[REQUEST_ID] = scoped
    structlog.contextvars.bind_contextvars(request_id=scoped)
    return scoped


def _denied(denied: BudgetExceeded, capped_by_default: bool) -> web.Response:
    reset = denied.reset_at
    retry_after = (
        max(1, math.ceil((reset - datetime.now(UTC)).total_seconds())) if reset is not None else None
    )
    when = f"; resets at {reset.isoformat()}" if reset is not None else "; it never resets"
    room = max(Decimal(0), denied.limit - denied.spent - denied.reserved)
    if denied.estimate > room and denied.spent + denied.reserved < denied.limit:
        # Not spent out: this request's upper bound does not fit what is left.
        hint = f"; this request could cost up to ${denied.estimate} and ${room} is left" + (
            " (no max_tokens was set, so the bound assumes the default output cap: "
            "set max_tokens or max_completion_tokens, or raise the budget)"
            if capped_by_default
            else " (lower max_tokens, or raise the budget)"
        )
    else:
        hint = ""
    message = (
        f"budget exceeded for {describe(denied.subject)}: spent ${denied.spent} "
        f"(+${denied.reserved} in flight) of ${denied.limit}{when}{hint}"
    )
    headers = {"x-should-retry": "false"}
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    body = {
        "error": {
            "message": message,
            "type": "budget_exceeded",
            "param": "tags",
            "code": "budget_exceeded",
            "tag": denied.tag or None,
            "subject": describe(denied.subject),
            "max_budget": str(denied.limit),
            "spend": str(denied.spent),
            "reserved": str(denied.reserved),
            "estimate": str(denied.estimate),
            "reset_at": reset.isoformat() if reset is not None else None,
        }
    }
    return web.Response(
        status=429, body=_encoder.encode(body), content_type="application/json", headers=headers
    )


def _rate_limited(limited: RateLimited) -> web.Response:
    limit = limited.limit
    setting = SETTING[limit.kind]
    message = (
        f"rate limit exceeded for {describe(limit.subject)}: {setting} allows {limit.maximum} "
        f"{UNIT[limit.kind]} ({limited.used} used); retry in {limited.retry_after_s} s"
    )
    body = {
        "error": {
            "message": message,
            "type": "rate_limit_exceeded",
            "param": None,
            "code": setting,
            "subject": describe(limit.subject),
            "limit": limit.maximum,
            "used": limited.used,
            "retry_after": limited.retry_after_s,
        }
    }
    # The client may retry after Retry-After (the OpenAI SDK honours it).
    headers = {"Retry-After": str(limited.retry_after_s)}
    return web.Response(
        status=429, body=_encoder.encode(body), content_type="application/json", headers=headers
    )


async def _relay(request: web.Request, kind: str) -> web.StreamResponse:
    app = request.app
    settings = app[SETTINGS]
    metrics = app[METRICS]
    body = _parse(await _read_body(request, settings.max_body_bytes))
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise ApiError(400, "model is required and must be a string", param="model")
    if len(model) > MAX_MODEL_LENGTH:
        # it reaches events, log lines and view keys: bounded like every such field
        raise ApiError(400, f"model must be at most {MAX_MODEL_LENGTH} characters", param="model")
    key = request[API_KEY]
    limits = Limits(settings.max_tags, settings.max_tag_length, settings.max_metadata_bytes)
    attribution = attribute(body, request.headers, key.tags if key else (), limits, app[USER_SECRET])
    gate = app[GATE]
    gate.check_scope(key, attribution.tags)  # before routing: a 403, whatever the route
    upstream, upstream_model = app[UPSTREAMS].route(model)
    ask = Ask(
        _scoped_request_id(request, key),
        kind,
        body,
        model,
        upstream_model,
        upstream.price_provider,
        attribution.tags,
        attribution.user_hash,
        attribution.metadata,
        key,
    )
    structlog.contextvars.bind_contextvars(model=model, tags=attribution.tags)
    started = time.perf_counter()
    try:
        # Refusals raise Refused (mapped in the error middleware). Redis down: the
        # policy (LEDGER_ON_REDIS_DOWN) is applied inside; under "deny" it raises
        # CountersUnavailable (a 503, recorded).
        result = await gate.admit(ask)
    except DuplicateRequest as e:
        raise ApiError(
            409,
            f"{e} by this key; it is never charged twice",
            type="conflict_error",
            param="x-request-id",
            code="duplicate_request_id",
            headers={"x-should-retry": "false"},
        ) from None
    metrics.admit_latency.observe(time.perf_counter() - started)
    if isinstance(result, Blocked):
        metrics.denials.inc()
        if isinstance(result.outcome, BudgetExceeded):
            structlog.contextvars.bind_contextvars(denied_by=result.outcome.tag)
            return _denied(result.outcome, result.capped_by_default)
        structlog.contextvars.bind_contextvars(limited_by=SETTING[result.outcome.limit.kind])
        return _rate_limited(result.outcome)
    outcome = result.admitted
    if not outcome.reserved and outcome.budgets:
        structlog.contextvars.bind_contextvars(unreserved=True)
    if result.inject is not None:
        field_name, cap = result.inject
        body[field_name] = cap

    body["model"] = upstream_model
    call = _Call(
        kind,
        ask.request_id,
        model,
        upstream,
        upstream_model,
        attribution,
        result.price,
        body,
        outcome,
        started,
        result.bound,
    )
    if kind != _Kind.EMBEDDINGS and body.get("stream") is True:
        return await _stream(request, call)
    return await _unary(request, call)


# ------------------------------------------------------------------ forwarding


def _upstream_headers(upstream: Upstream, request_id: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if upstream.auth_header:
        headers["Authorization"] = upstream.auth_header
    if request_id:
        headers["X-Request-Id"] = request_id
    return headers


def _tokens(usage: Any) -> Tokens | None:
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens", 0))
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens", 0) if isinstance(details, dict) else 0
    cached = cached if isinstance(cached, int) and not isinstance(cached, bool) else 0
    return Tokens(max(0, prompt), max(0, completion), max(0, cached))


async def _release(request: web.Request, call: _Call, reason: str, status: int | None) -> None:
    await request.app[ADMISSION].release(call.admitted, reason, status, wait_settle=False)
    request.app[METRICS].requests.labels(call.kind, str(status or 502)).inc()
    structlog.contextvars.bind_contextvars(released=reason)


async def _record(
    request: web.Request,
    call: _Call,
    tokens: Tokens | None,
    *,
    status: int,
    streamed: bool,
    source: str,
) -> Decimal:
    """SpendRecorded (durable before this returns), then the counters settle."""
    clamped = False
    reported: tuple[int, int] | None = None
    if tokens is None:
        cost, source = call.admitted.estimate, "estimate"
        tokens = Tokens()
    else:
        raw = tokens
        tokens, clamped = _within_bound(call, raw)
        if clamped:
            reported = (raw.prompt, raw.completion)
            log.warning("usage_clamped", reported=reported, charged=(tokens.prompt, tokens.completion))
        cost = call.price.cost(tokens) if call.price is not None else Decimal(0)
    latency_ms = round((time.perf_counter() - call.started) * 1000, 1)
    try:
        recorded = await _record_spend(
            request, call, cost, tokens, latency_ms, status, streamed, source, clamped, reported
        )
    except StoreUnavailable as e:
        # Unlike a refusal before admission: the upstream did the work.
        raise ApiError(
            503,
            "the upstream answered but its spend could not be recorded (PostgreSQL unavailable); "
            "it will be charged at most its reserved bound when its reservation expires",
            type="service_unavailable",
            code="store_unavailable",
        ) from e
    metrics = request.app[METRICS]
    metrics.requests.labels(call.kind, str(status)).inc()
    metrics.cost.inc(float(recorded.cost))
    metrics.upstream_latency.labels(call.upstream.name).observe(latency_ms / 1000)
    structlog.contextvars.bind_contextvars(cost=str(recorded.cost), latency_ms=latency_ms)
    return recorded.cost


async def _record_spend(
    request: web.Request,
    call: _Call,
    cost: Decimal,
    tokens: Tokens,
    latency_ms: float,
    status: int,
    streamed: bool,
    source: str,
    clamped: bool,
    reported: tuple[int, int] | None,
) -> Recorded:
    return await request.app[ADMISSION].record_spend(
        call.admitted,
        cost,
        wait_settle=False,
        model=call.model,
        provider=call.upstream.name,
        user_hash=call.attribution.user_hash,
        metadata=call.attribution.metadata,
        prompt_tokens=tokens.prompt,
        completion_tokens=tokens.completion,
        cached_tokens=tokens.cached,
        latency_ms=latency_ms,
        status=status,
        streamed=streamed,
        unpriced=call.price is None,
        usage_source=source,
        usage_clamped=clamped,
        reported_prompt_tokens=reported[0] if reported else None,
        reported_completion_tokens=reported[1] if reported else None,
    )


def _within_bound(call: _Call, reported: Tokens) -> tuple[Tokens, bool]:
    """The usage to charge: what the upstream reported, but never more than the
    request could use once a budget applies (that bound was reserved, and the
    gateway forwarded its output cap), and never beyond what can be stored."""
    prompt_cap = completion_cap = MAX_RECORDED_TOKENS
    if call.admitted.budgets:
        prompt_cap, completion_cap = call.bound.prompt, call.bound.completion
    prompt = min(reported.prompt, prompt_cap, MAX_RECORDED_TOKENS)
    completion = min(reported.completion, completion_cap, MAX_RECORDED_TOKENS)
    tokens = Tokens(prompt, completion, min(reported.cached, prompt))
    return tokens, (tokens.prompt, tokens.completion) != (reported.prompt, reported.completion)


def _ledger_headers(call: _Call, cost: Decimal | None) -> dict[str, str]:
    # LiteLLM's names next to ours, for clients and dashboards built on them
    headers = {"x-ledger-request-id": call.request_id, "x-litellm-call-id": call.request_id}
    if cost is not None:
        headers["x-ledger-cost"] = headers["x-litellm-response-cost"] = str(cost)
        remaining = call.admitted.remaining_after(cost)
        if remaining is not None:
            headers["x-ledger-budget-remaining"] = str(remaining)
    return headers


class _TooLarge(Exception):
    pass


async def _read_limited(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    data = bytearray()
    async for chunk in resp.content.iter_chunked(1 << 16):
        data += chunk
        if len(data) > limit:
            raise _TooLarge
    return bytes(data)


def _upstream_failure(e: BaseException, call: _Call) -> tuple[str, int, str]:
    """(reason, status for the client, message) for a failed upstream call."""
    name = call.upstream.name
    if isinstance(e, TimeoutError):
        return "upstream_timeout", 504, f"upstream {name} timed out"
    if isinstance(e, _TooLarge):
        return (
            "upstream_response_too_large",
            502,
            f"upstream {name} sent a response over the size limit",
        )
    if isinstance(e, aiohttp.ClientPayloadError):
        return "upstream_cut", 502, f"upstream {name} cut the response short"
    return "upstream_unreachable", 502, f"upstream {name} could not be reached ({type(e).__name__})"


async def _upstream_refused(
    request: web.Request, call: _Call, status: int, data: bytes, content_type: str
) -> web.Response:
    """Release and record an upstream error status; pass it on, except the
    upstream refusing the gateway's own credentials, which is a 502."""
    await _release(request, call, f"upstream_status_{status}", status)
    if status in (401, 403):
        return error_response(
            502,
            f"upstream {call.upstream.name} refused the gateway's credentials ({status})",
            type="upstream_error",
            code="upstream_auth",
            headers=_ledger_headers(call, None),
        )
    return web.Response(
        status=status, body=data, headers={"Content-Type": content_type, **_ledger_headers(call, None)}
    )


async def _unary(request: web.Request, call: _Call) -> web.StreamResponse:
    url = call.upstream.url(_PATHS[call.kind])
    try:
        async with call.upstream.session.post(
            url,
            data=_upstream_body(call.body),
            headers=_upstream_headers(call.upstream, call.request_id),
        ) as resp:
            return await _answer(request, call, resp)
    except (aiohttp.ClientError, TimeoutError) as e:
        reason, code, message = _upstream_failure(e, call)
        await _release(request, call, reason, None)
        return error_response(
            code, message, type="upstream_error", code=reason, headers=_ledger_headers(call, None)
        )


async def _answer(request: web.Request, call: _Call, resp: aiohttp.ClientResponse) -> web.StreamResponse:
    """A whole (non-streamed) answer: passed on and charged from its usage."""
    status = resp.status
    content_type = resp.headers.get("Content-Type", "application/json")
    passed = {h: resp.headers[h] for h in _PASS_HEADERS if h in resp.headers}
    try:
        data = await _read_limited(resp, request.app[SETTINGS].max_response_bytes)
    except (aiohttp.ClientError, TimeoutError, _TooLarge) as e:
        reason, code, message = _upstream_failure(e, call)
        if status >= 400:
            await _release(request, call, reason, status)
            return error_response(
                code, message, type="upstream_error", code=reason, headers=_ledger_headers(call, None)
            )
        # It answered 2xx and was producing: the work is done and will be billed,
        # whatever stopped the body (too large, cut, slow). Charge the reserved bound.
        cost = await _record(request, call, None, status=code, streamed=False, source="estimate")
        return error_response(
            code, message, type="upstream_error", code=reason, headers=_ledger_headers(call, cost)
        )
    if status >= 400:
        return await _upstream_refused(request, call, status, data, content_type)
    try:
        answer = _answer_decoder.decode(data)  # validates it all, keeps only usage
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        # A 2xx the gateway cannot read: it may still be billed; charge the bound.
        cost = await _record(request, call, None, status=502, streamed=False, source="estimate")
        return error_response(
            502,
            f"upstream {call.upstream.name} returned invalid JSON",
            type="upstream_error",
            code="upstream_invalid_json",
            headers=_ledger_headers(call, cost),
        )
    tokens = _tokens(answer.usage)
    cost = await _record(request, call, tokens, status=status, streamed=False, source="upstream")
    return web.Response(
        status=status,
        body=data,
        headers={"Content-Type": content_type, **passed, **_ledger_headers(call, cost)},
    )


# ------------------------------------------------------------------ streaming


def _sse_error(message: str, code: str) -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return b"data: " + _encoder.encode(body) + b"\n\n"


async def _stream(request: web.Request, call: _Call) -> web.StreamResponse:
    options = call.body.get("stream_options")
    client_wants_usage = isinstance(options, dict) and options.get("include_usage") is True
    # Always ask for usage; hide the extra chunk from a client that did not.
    call.body["stream_options"] = {
        **(options if isinstance(options, dict) else {}),
        "include_usage": True,
    }
    url = call.upstream.url(_PATHS[call.kind])
    headers = _upstream_headers(call.upstream, call.request_id)
    headers["Accept"] = "text/event-stream"
    try:
        resp = await call.upstream.session.post(url, data=_upstream_body(call.body), headers=headers)
    except (aiohttp.ClientError, TimeoutError) as e:
        reason, code, message = _upstream_failure(e, call)
        await _release(request, call, reason, None)
        return error_response(
            code, message, type="upstream_error", code=reason, headers=_ledger_headers(call, None)
        )
    try:
        if resp.status >= 400:
            try:
                data = await _read_limited(resp, request.app[SETTINGS].max_response_bytes)
            except (aiohttp.ClientError, TimeoutError, _TooLarge):
                data = b""
            content_type = resp.headers.get("Content-Type", "application/json")
            return await _upstream_refused(request, call, resp.status, data, content_type)
        if resp.headers.get("Content-Type", "").startswith("application/json"):
            return await _answer(request, call, resp)  # an upstream that does not stream
        return await _pipe(request, call, resp, client_wants_usage)
    finally:
        resp.release()


class _Chunk(msgspec.Struct):
    """What the gateway reads of a streamed chunk (the rest passes through as bytes)."""

    choices: Any = None
    usage: Any = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)


@dataclass(slots=True)
class _Streamed:
    """What a stream has carried so far: enough to charge it if no usage comes."""

    client_wants_usage: bool
    usage: Tokens | None = None
    usage_event: dict[str, Any] | None = None  # held back to carry its cost (if the client asked)
    produced: list[str] = field(default_factory=list)
    chunks: int = 0  # events that carried text
    events: int = 0  # data events seen

    def read(self, event: sse.Event) -> bytes | None:
        """What to pass on for ``event`` now (None: nothing, or not yet)."""
        if event.data is None:
            return event.raw  # a comment, or an event without data
        self.events += 1
        try:
            chunk = _chunk_decoder.decode(event.data)
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            return event.raw
        texts = list(delta_texts(chunk.choices))
        if texts:
            self.produced += texts
            self.chunks += 1
        found = _tokens(chunk.usage)
        if found is None:
            return event.raw
        self.usage = found
        obj = _decoder.decode(event.data)
        if self.client_wants_usage:
            self.usage_event = obj  # written once recorded, with its cost
            return None
        if texts:
            # content and usage in one chunk (some upstreams): the content goes on
            del obj["usage"]
            return _sse(obj)
        return None  # the usage chunk the client did not ask for


def _sse(obj: Any) -> bytes:
    return b"data: " + _encoder.encode(obj) + b"\n\n"


async def _pipe(
    request: web.Request, call: _Call, resp: aiohttp.ClientResponse, client_wants_usage: bool
) -> web.StreamResponse:
    out = web.StreamResponse(
        status=200,
        headers={
            "Content-Type": resp.headers.get("Content-Type", "text/event-stream"),
            "Cache-Control": "no-cache",
            **_ledger_headers(call, None),
        },
    )
    await out.prepare(request)
    seen = _Streamed(client_wants_usage)
    events = sse.Splitter()
    done: bytes | None = None
    failure: BaseException | None = None
    received = 0
    try:
        async for chunk in resp.content.iter_any():
            received += len(chunk)
            for event in events.feed(chunk):
                if event.data == b"[DONE]":
                    done = event.raw  # held back until the spend is recorded
                    continue
                passed = seen.read(event)
                if passed is not None:
                    await out.write(passed)
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        # The client left: stop the upstream and charge what was produced.
        resp.close()
        await _record_stream(request, call, seen, status=499, source="partial")
        return out
    except asyncio.CancelledError:
        # Same, when the server cancels handlers of vanished clients: record in
        # a task of its own so the cancellation cannot cut the append short.
        resp.close()
        task = asyncio.ensure_future(_record_stream(request, call, seen, status=499, source="partial"))
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.shield(task)
        raise
    except (aiohttp.ClientError, TimeoutError) as e:
        failure = e
    if received == 0:
        # Nothing came through: nothing was produced to charge.
        reason, _code, message = _upstream_failure(failure or aiohttp.ClientPayloadError(), call)
        await _release(request, call, reason, 200)
        with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
            await out.write(_sse_error(message, reason))
            await out.write_eof()
        return out
    # The upstream answered and produced something. Without usage (a cut stream,
    # an upstream that ignores include_usage), what it produced is counted and
    # charged; if none of it could be read, the reserved bound is.
    if seen.usage is None and seen.events == 0:
        cost = await _record(request, call, None, status=200, streamed=True, source="estimate")
    else:
        cost = await _record_stream(request, call, seen, status=200, source="upstream")
    try:
        rest = events.rest()
        if failure is not None or (seen.usage is None and done is None):
            reason, _code, message = _upstream_failure(failure or aiohttp.ClientPayloadError(), call)
            await out.write(_sse_error(message, reason))
        elif rest:
            await out.write(rest)
        if seen.usage_event is not None:
            seen.usage_event["usage"]["cost"] = str(cost)  # OpenRouter's convention
            await out.write(_sse(seen.usage_event))
        # A comment line of the [DONE] event (not an event of its own: a client that
        # keeps the last event id, as the openai SDK does, would parse an empty one).
        await out.write(f": ledger cost={cost} request_id={call.request_id}\n".encode())
        if done is not None and failure is None:
            await out.write(done)
        await out.write_eof()
    except (ConnectionResetError, aiohttp.ClientConnectionResetError):
        pass  # recorded already: the client left after the last content chunk
    return out


async def _record_stream(
    request: web.Request, call: _Call, seen: _Streamed, *, status: int, source: str
) -> Decimal:
    """Charge a stream: its usage, or what it produced, counted."""
    if seen.usage is not None:
        return await _record(request, call, seen.usage, status=status, streamed=True, source="upstream")
    counted = count_tokens(
        call.upstream_model,
        call.body,
        seen.produced,
        seen.chunks,
        request.app[SETTINGS].image_token_bound,
    )
    structlog.contextvars.bind_contextvars(usage_counted=counted.source)
    tokens = Tokens(counted.prompt, counted.completion)
    label = source if source == "partial" else f"counted_{counted.source}"
    return await _record(request, call, tokens, status=status, streamed=True, source=label)
