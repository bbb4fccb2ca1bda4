"""Who may call what. Every route needs the admin key unless marked otherwise,
so a new route is protected by default."""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable
from typing import Any, TypeVar

from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.appkeys import API_KEY, KEY_BOOK, SETTINGS
from gateway.errors import ApiError

PUBLIC = "public"
ADMIN = "admin"
CLIENT = "client"  # a client API key (or the admin key) — the proxy routes
_ATTR = "__ledger_access__"
# Credentials never travel in URLs: they end up in access logs and browser history.
_SECRET_PARAMS = frozenset({"key", "api_key", "apikey", "admin_key", "token", "access_token"})
_KEY_HASH = re.compile(r"[0-9a-f]{64}")

F = TypeVar("F", bound=Callable[..., Any])


def public(handler: F) -> F:
    """Mark a handler as reachable without any key (health checks)."""
    setattr(handler, _ATTR, PUBLIC)
    return handler


def client(handler: F) -> F:
    """Mark a handler as needing a client API key (the admin key works too)."""
    setattr(handler, _ATTR, CLIENT)
    return handler


def access_of(handler: Any) -> str:
    return str(getattr(handler, _ATTR, ADMIN))


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def same_secret(given: str, expected: str) -> bool:
    """Constant-time comparison that does not leak the expected length either."""
    return hmac.compare_digest(
        hashlib.sha256(given.encode()).digest(), hashlib.sha256(expected.encode()).digest()
    )


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.match_info.http_exception is not None:
        return await handler(request)  # unknown route or method: 404/405 as usual
    if access_of(request.match_info.handler) == PUBLIC:
        return await handler(request)
    # A key's SHA-256 (what /key/list shows, LiteLLM's "token") names a key without
    # being one, so LiteLLM's GET /key/info?key=<hash> and ?api_key=<hash> filters work.
    expected = request.app[SETTINGS].admin_key
    leaked = {
        k
        for k, v in request.query.items()
        if k.lower() in _SECRET_PARAMS
        and (not _KEY_HASH.fullmatch(v) or (expected is not None and same_secret(v, expected)))
    }
    if leaked:
        raise ApiError(
            400,
            f"credentials must not be sent in the URL (query parameter {sorted(leaked)[0]!r}); "
            "use the Authorization: Bearer header, and name a client key by its key_hash",
            param=sorted(leaked)[0],
            code="credentials_in_url",
        )
    token = bearer_token(request)
    if access_of(request.match_info.handler) == CLIENT:
        if token is None:
            raise ApiError(
                401,
                "missing API key: send Authorization: Bearer <key> (create one with POST /key/generate)",
                type="authentication_error",
                code="missing_api_key",
            )
        key = request.app[KEY_BOOK].authenticate(token)
        if key is None and not (expected is not None and same_secret(token, expected)):
            raise ApiError(401, "invalid API key", type="authentication_error", code="invalid_api_key")
        request[API_KEY] = key  # None for the admin key: no bound tags, every model
        return await handler(request)
    if token is None:
        raise ApiError(
            401,
            "missing admin key: send Authorization: Bearer <LEDGER_ADMIN_KEY>",
            type="authentication_error",
            code="missing_api_key",
        )
    if expected is None or not same_secret(token, expected):
        raise ApiError(401, "invalid admin key", type="authentication_error", code="invalid_api_key")
    return await handler(request)
