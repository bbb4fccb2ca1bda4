"""HTTP errors in the OpenAI error envelope: {"error": {message, type, param, code}}."""

from __future__ import annotations

import msgspec
from aiohttp import web


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorEnvelope(msgspec.Struct):
    error: ErrorBody


_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An error the client should see, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_response(
    status: int,
    message: str,
    *,
    type: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    body = _encoder.encode(ErrorEnvelope(ErrorBody(message, type, param, code)))
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)


def from_api_error(e: ApiError) -> web.Response:
    return error_response(e.status, e.message, type=e.type, param=e.param, code=e.code, headers=e.headers)
