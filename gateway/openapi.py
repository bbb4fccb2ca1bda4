"""/openapi.json, generated from the msgspec Structs the handlers decode and
encode, so the document cannot drift from the code."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from gateway import admin
from gateway.auth import public
from gateway.errors import ErrorEnvelope

routes = web.RouteTableDef()

# Money is accepted as a number or a numeric string, and answered as a number.
_DECIMAL_IN: dict[str, Any] = {"type": ["number", "string"]}
_DECIMAL_OUT: dict[str, Any] = {"type": "number"}
_ERRORS = {
    "400": "malformed request (the message and `param` name the problem)",
    "401": "missing or wrong key",
    "404": "not found",
    "409": "conflict",
    "413": "body too large",
    "422": "a value breaks a rule",
    "503": "PostgreSQL or Redis unavailable",
}
_REQUESTS = (admin.TagNew, admin.TagUpdate, admin.TagName, admin.TagNames, admin.KeyGenerate, admin.KeyRef)
_RESPONSES = (
    admin.TagInfo,
    admin.TagDeleted,
    admin.HistoryItem,
    admin.KeyView,
    admin.KeyCreated,
    admin.KeyDeletedView,
    ErrorEnvelope,
)

_ANY_ROWS = {"type": "array", "items": {"type": "object"}}
_DAYS = [("start_date", "UTC day (YYYY-MM-DD)"), ("end_date", "UTC day (YYYY-MM-DD), inclusive")]
_DATES = [
    ("start_date", "date (YYYY-MM-DD) or ISO timestamp"),
    ("end_date", "date or ISO timestamp, inclusive"),
]


def _fix_decimals(node: Any, replacement: dict[str, Any]) -> Any:
    if isinstance(node, dict):
        if node.get("type") == "string" and node.get("format") == "decimal":
            return dict(replacement)
        return {k: _fix_decimals(v, replacement) for k, v in node.items()}
    if isinstance(node, list):
        return [_fix_decimals(v, replacement) for v in node]
    return node


def _ref(kind: type) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{kind.__name__}"}


def _op(
    summary: str,
    ok: str,
    ok_schema: dict[str, Any],
    *,
    body: type | None = None,
    params: list[tuple[str, str]] | None = None,
    path_params: list[str] | None = None,
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"adminKey": []}],
        "responses": {
            ok: {"description": "OK", "content": {"application/json": {"schema": ok_schema}}},
            **{
                code: {"description": why, "content": {"application/json": {"schema": _ref(ErrorEnvelope)}}}
                for code, why in _ERRORS.items()
            },
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, "content": {"application/json": {"schema": _ref(body)}}}
    parameters = [
        {"name": n, "in": "query", "required": False, "description": d, "schema": {"type": "string"}}
        for n, d in params or []
    ]
    parameters += [
        {"name": n, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
        for n in path_params or []
    ]
    if parameters:
        op["parameters"] = parameters
    return op


def build() -> dict[str, Any]:
    _, requests = msgspec.json.schema_components(_REQUESTS, ref_template="#/components/schemas/{name}")
    _, responses = msgspec.json.schema_components(_RESPONSES, ref_template="#/components/schemas/{name}")
    schemas = {**_fix_decimals(responses, _DECIMAL_OUT), **_fix_decimals(requests, _DECIMAL_IN)}
    info_map = {"type": "object", "additionalProperties": _ref(admin.TagInfo)}
    paths = {
        "/tag/new": {"post": _op("Create a tag budget", "201", _ref(admin.TagInfo), body=admin.TagNew)},
        "/tag/update": {
            "post": _op("Change a tag (partial)", "200", _ref(admin.TagInfo), body=admin.TagUpdate)
        },
        "/tag/delete": {"post": _op("Delete a tag", "200", _ref(admin.TagDeleted), body=admin.TagName)},
        "/tag/info": {
            "post": _op("Tags with spend in the current window", "200", info_map, body=admin.TagNames),
            "get": _op(
                "Tags with spend in the current window",
                "200",
                info_map,
                params=[("names", "comma-separated tag names")],
            ),
        },
        "/tag/list": {"get": _op("Every live tag", "200", {"type": "array", "items": _ref(admin.TagInfo)})},
        "/tag/{name}/history": {
            "get": _op(
                "A tag's events",
                "200",
                {"type": "array", "items": _ref(admin.HistoryItem)},
                path_params=["name"],
            )
        },
        "/key/generate": {
            "post": _op(
                "Create a client key (shown once)", "201", _ref(admin.KeyCreated), body=admin.KeyGenerate
            )
        },
        "/key/info": {"post": _op("A key's record", "200", _ref(admin.KeyView), body=admin.KeyRef)},
        "/key/delete": {"post": _op("Delete a key", "200", _ref(admin.KeyDeletedView), body=admin.KeyRef)},
        "/key/list": {"get": _op("Every live key", "200", {"type": "array", "items": _ref(admin.KeyView)})},
        "/spend/tags": {"get": _op("Spend per tag", "200", _ANY_ROWS, params=_DATES)},
        "/spend/users": {
            "get": _op("Spend per (hashed) user", "200", _ANY_ROWS, params=[*_DATES, ("limit", "1-10000")])
        },
        "/spend/logs": {
            "get": _op(
                "Spend logs, newest first",
                "200",
                {"type": "object"},
                params=[
                    *_DATES,
                    ("tag", ""),
                    ("user", "raw end-user id (hashed for the lookup)"),
                    ("user_hash", ""),
                    ("model", ""),
                    ("status", "HTTP status"),
                    ("kind", "spend|expired|released|denied"),
                    ("limit", "1-1000"),
                    ("cursor", "next_cursor of the previous page"),
                    ("format", "json|csv"),
                ],
            )
        },
        "/spend/report": {
            "get": _op(
                "Spend per group and period",
                "200",
                {"type": "object"},
                params=[
                    *_DATES,
                    ("group_by", "tag|user|model|metadata.<key>"),
                    ("interval", "day|week|month"),
                ],
            )
        },
        "/tag/daily/activity": {
            "get": _op(
                "Daily spend per tag and model",
                "200",
                _ANY_ROWS,
                params=[*_DATES, ("tags", "comma-separated")],
            )
        },
        "/alerts": {"get": _op("The newest budget alerts", "200", _ANY_ROWS, params=[("limit", "1-500")])},
        "/ui/api/overview": {
            "get": _op(
                "Dashboard: top-line numbers, spend per UTC day", "200", {"type": "object"}, params=_DAYS
            )
        },
        "/ui/api/tag": {
            "get": _op(
                "Dashboard: one tag by model, user, denial",
                "200",
                {"type": "object"},
                params=[("name", "tag"), *_DAYS],
            )
        },
        "/user/info": {
            "get": _op(
                "One end user's spend",
                "200",
                {"type": "object"},
                params=[("user", "raw id"), ("user_hash", "")],
            )
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "budget-ledger admin API", "version": "0.1.0"},
        "components": {
            "schemas": schemas,
            "securitySchemes": {"adminKey": {"type": "http", "scheme": "bearer"}},
        },
        "paths": paths,
    }


_document = msgspec.json.encode(build())


@routes.get("/openapi.json")
@public
async def openapi(request: web.Request) -> web.Response:
    return web.Response(body=_document, content_type="application/json")
