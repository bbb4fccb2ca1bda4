"""/openapi.json, generated from the msgspec Structs the handlers decode and
encode, so the document cannot drift from the code."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

from gateway import activity, admin, customers, keys_api, spend_api
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
_REQUESTS = (
    admin.TagNew,
    admin.TagUpdate,
    admin.TagName,
    admin.TagNames,
    keys_api.KeyGenerate,
    keys_api.KeyUpdate,
    keys_api.KeyRef,
    keys_api.KeyDelete,
    customers.CustomerNew,
    customers.CustomerUpdate,
    customers.UserIds,
)
_RESPONSES = (
    admin.TagInfo,
    admin.TagChanged,
    admin.TagDeleted,
    admin.HistoryItem,
    keys_api.KeyInfoView,
    keys_api.KeyCreated,
    keys_api.KeyUpdated,
    keys_api.KeysDeleted,
    keys_api.KeyList,
    customers.CustomerView,
    customers.CustomersDeleted,
    customers.BlockedUsers,
    spend_api.TagSpend,
    spend_api.SpendLog,
    activity.DailyActivity,
    activity.KeyReport,
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


def _file_op(op: dict[str, Any]) -> dict[str, Any]:
    op["responses"]["200"]["content"] = {
        "text/csv": {"schema": {"type": "string"}},
        "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
    }
    return op


def _op(
    summary: str,
    ok: str,
    ok_schema: dict[str, Any],
    *,
    body: type | None = None,
    params: list[tuple[str, str]] | None = None,
    path_params: list[str] | None = None,
    csv: bool = False,
) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": ok_schema}}
    if csv:
        content["text/csv"] = {"schema": {"type": "string"}}
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"adminKey": []}],
        "responses": {
            ok: {"description": "OK", "content": content},
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
    activity_params = [
        *_DATES,
        ("model", ""),
        ("api_key", "a key's key_hash"),
        ("page", "1, 2, ... (pages of whole days, newest first)"),
        ("page_size", "days per page, 1-1000"),
    ]
    paths: dict[str, Any] = {
        "/tag/new": {"post": _op("Create a tag budget", "200", _ref(admin.TagChanged), body=admin.TagNew)},
        "/tag/update": {
            "post": _op(
                "Change a tag (partial); spend sets its spend",
                "200",
                _ref(admin.TagChanged),
                body=admin.TagUpdate,
            )
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
        "/tag/list": {
            "get": _op(
                "Every defined tag, then tags only seen in traffic",
                "200",
                {"type": "array", "items": _ref(admin.TagInfo)},
                params=[
                    ("start_date", "YYYY-MM-DD, with end_date"),
                    ("end_date", "YYYY-MM-DD, with start_date"),
                ],
            )
        },
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
                "Create a client key (shown once)",
                "200",
                _ref(keys_api.KeyCreated),
                body=keys_api.KeyGenerate,
            )
        },
        "/key/info": {
            "get": _op(
                "A key's record", "200", _ref(keys_api.KeyInfoView), params=[("key", "the key's key_hash")]
            ),
            "post": _op("A key's record", "200", _ref(keys_api.KeyInfoView), body=keys_api.KeyRef),
        },
        "/key/update": {
            "post": _op("Change a key (partial)", "200", _ref(keys_api.KeyUpdated), body=keys_api.KeyUpdate)
        },
        "/key/delete": {
            "post": _op("Delete keys", "200", _ref(keys_api.KeysDeleted), body=keys_api.KeyDelete)
        },
        "/key/list": {
            "get": _op(
                "Keys, a page at a time",
                "200",
                _ref(keys_api.KeyList),
                params=[
                    ("page", "from 1"),
                    ("size", "1-100"),
                    ("user_id", ""),
                    ("team_id", ""),
                    ("key_alias", ""),
                    ("key_hash", ""),
                    ("return_full_object", "true|false"),
                    ("include_team_keys", "true|false"),
                    ("sort_by", "created_at|updated_at|key_alias|user_id|team_id|expires"),
                    ("sort_order", "asc|desc"),
                    ("organization_id", "not supported: empty"),
                ],
            )
        },
        "/spend/tags": {
            "get": _op(
                "Spend per tag", "200", {"type": "array", "items": _ref(spend_api.TagSpend)}, params=_DATES
            )
        },
        "/spend/users": {
            "get": _op("Spend per (hashed) user", "200", _ANY_ROWS, params=[*_DATES, ("limit", "1-10000")])
        },
        "/spend/logs": {
            "get": _op(
                "Spend logs, newest first (SpendLog rows), or with both dates a summary per day",
                "200",
                _ANY_ROWS,
                csv=True,
                params=[
                    *_DATES,
                    ("tag", ""),
                    ("user", "raw end-user id (hashed for the lookup)"),
                    ("user_hash", ""),
                    ("model", ""),
                    ("status", "HTTP status"),
                    ("kind", "spend|expired|released|denied"),
                    ("limit", "1-1000: one page; the next page's cursor is in x-ledger-next-cursor"),
                    ("cursor", "x-ledger-next-cursor of the previous page"),
                    ("format", "json|csv"),
                    ("api_key", "a key's key_hash"),
                    ("user_id", "the keys' owner (user_id)"),
                    ("request_id", ""),
                    ("summarize", "true|false (with both dates)"),
                ],
            )
        },
        "/spend/report": {
            "get": _op(
                "Spend per group and period; per group, the change against the period before",
                "200",
                {"type": "object"},
                csv=True,
                params=[
                    *_DATES,
                    ("group_by", "tag|tag:<dimension>|user|model|metadata.<key>"),
                    ("allocation", "split|full (split: the rows of a tag dimension sum to the total)"),
                    ("interval", "day|week|month"),
                    ("format", "json|csv"),
                ],
            )
        },
        "/spend/export": {
            "get": _file_op(
                _op(
                    "The period's charges as a FOCUS 1.2 dataset (CSV, or Parquet with file=parquet)",
                    "200",
                    {"type": "string"},
                    params=[*_DATES, ("format", "focus"), ("file", "csv|parquet")],
                )
            )
        },
        "/global/spend/report": {
            "get": _op(
                "Spend per day and team, customer or tag; or per API key",
                "200",
                _ANY_ROWS,
                params=[
                    *_DATES,
                    ("group_by", "team|customer|api_key|tag"),
                    ("api_key", "a key's key_hash"),
                    ("internal_user_id", "the keys' owner (user_id)"),
                    ("team_id", ""),
                    ("customer_id", "raw end-user id"),
                ],
            )
        },
        "/tag/daily/activity": {
            "get": _op(
                "Daily spend per tag, model, provider and key",
                "200",
                _ref(activity.DailyActivity),
                params=[*activity_params, ("tags", "comma-separated")],
            )
        },
        "/user/daily/activity": {
            "get": _op(
                "Daily spend per end user",
                "200",
                _ref(activity.DailyActivity),
                params=[*activity_params, ("user_id", "raw end-user id"), ("user_hash", "")],
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
    view = _ref(customers.CustomerView)
    for prefix in ("/customer", "/end_user"):
        paths |= {
            f"{prefix}/new": {"post": _op("Create an end user", "200", view, body=customers.CustomerNew)},
            f"{prefix}/info": {
                "get": _op(
                    "An end user",
                    "200",
                    view,
                    params=[("end_user_id", "raw end-user id (hashed for the lookup)"), ("user_hash", "")],
                )
            },
            f"{prefix}/update": {
                "post": _op("Change an end user (partial)", "200", view, body=customers.CustomerUpdate)
            },
            f"{prefix}/delete": {
                "post": _op(
                    "Delete end users", "200", _ref(customers.CustomersDeleted), body=customers.UserIds
                )
            },
            f"{prefix}/list": {
                "get": _op("Every end user (by hash)", "200", {"type": "array", "items": view})
            },
            f"{prefix}/block": {
                "post": _op("Block end users", "200", _ref(customers.BlockedUsers), body=customers.UserIds)
            },
            f"{prefix}/unblock": {
                "post": _op("Unblock end users", "200", _ref(customers.BlockedUsers), body=customers.UserIds)
            },
            f"{prefix}/daily/activity": {
                "get": _op(
                    "Daily spend per end user",
                    "200",
                    _ref(activity.DailyActivity),
                    params=[*activity_params, ("end_user_ids", "comma-separated raw ids")],
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
