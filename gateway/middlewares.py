"""Request id binding and the one place where errors become HTTP responses."""

from __future__ import annotations

import re
import time
import uuid

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.appkeys import REQUEST_ID
from gateway.errors import ApiError, error_response, from_api_error
from ledger.admission import DuplicateRequest
from ledger.counters import CountersUnavailable
from ledger.errors import ConcurrencyError, InvalidEvent, StoreUnavailable
from ledger.gate import Refused
from ledger.postgres.store import is_unavailable
from ledger.tags import TagError

log = structlog.get_logger("gateway")

REQUEST_ID_HEADER = "x-ledger-request-id"
DASHBOARD_HEADER = "x-ledger-client"  # "dashboard" on the dashboard's own API calls
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

_STATUS_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}


def request_id_of(request: web.Request) -> str:
    """An incoming x-request-id when it is sane, else a fresh one."""
    incoming = request.headers.get("x-request-id")
    if incoming and _REQUEST_ID_RE.match(incoming):
        return incoming
    return uuid.uuid4().hex


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    started = time.perf_counter()
    response = await handler(request)
    if not response.prepared:
        # the handler may have scoped the id to its key (see gateway/proxy.py)
        response.headers[REQUEST_ID_HEADER] = request[REQUEST_ID]
    if not request.path.startswith("/health"):
        # The dashboard polls: its page, files and API calls are debug, not one info line each.
        quiet = request.path.startswith("/ui") or request.headers.get(DASHBOARD_HEADER) == "dashboard"
        (log.debug if quiet else log.info)(
            "request",
            method=request.method,
            path=request.path,
            status=response.status,
            ms=round((time.perf_counter() - started) * 1000, 3),
        )
    return response


@web.middleware
async def errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Translate domain and aiohttp errors into the OpenAI error envelope."""
    try:
        return await handler(request)
    except ApiError as e:
        return from_api_error(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else e.reason
        if e.status == 404:
            message = f"no route for {request.method} {request.path}"
        elif e.status == 405:
            message = f"method {request.method} not allowed on {request.path}"
        return error_response(e.status, message, type=_STATUS_TYPES.get(e.status, "invalid_request_error"))
    except Refused as e:
        # the gate's refusals: a wrong request, or one its key, tags or user may not make
        status = 403 if e.reason == "forbidden" else 400
        return error_response(
            status,
            str(e),
            type=_STATUS_TYPES.get(status, "invalid_request_error"),
            param=e.param,
            code=e.code,
        )
    except TagError as e:
        return error_response(
            e.status,
            str(e),
            type=_STATUS_TYPES.get(e.status, "invalid_request_error"),
            param=e.field,
        )
    except DuplicateRequest as e:
        return error_response(409, str(e), type="conflict_error", code="duplicate_request_id")
    except CountersUnavailable as e:
        log.warning("counters_unavailable", error=str(e))
        return error_response(
            503,
            "budget counters (Redis) are unavailable; retry later",
            type="service_unavailable",
            code="redis_unavailable",
        )
    except InvalidEvent as e:
        return error_response(400, str(e), type="invalid_request_error", code="unstorable_value")
    except ConcurrencyError as e:
        return error_response(409, str(e), type="conflict_error", code="version_conflict")
    except StoreUnavailable as e:
        log.warning("store_unavailable", error=str(e))
        return error_response(
            503,
            "the event store (PostgreSQL) is unavailable: the request was not sent upstream and "
            "is not charged; retry later (if you set x-request-id and the first attempt was "
            "recorded, a retry with the same id is answered 409: released, never charged)",
            type="service_unavailable",
            code="store_unavailable",
        )
    except Exception as e:
        if is_unavailable(e):  # a read (reports, the dashboard) met a database that is away
            log.warning("database_unavailable", path=request.path, error=f"{type(e).__name__}: {e}")
            return error_response(
                503,
                "the database is unavailable; nothing was changed, retry later",
                type="service_unavailable",
                code="database_unavailable",
            )
        log.exception("unhandled_error", method=request.method, path=request.path)
        return error_response(500, "internal error", type="internal_error")
