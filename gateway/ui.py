"""The dashboard: static HTML and JS (uPlot vendored, no CDN), plus /alerts.

The page itself is public and holds no data; it asks for the admin key, keeps
it in session storage, and calls the admin API with it.
"""

from __future__ import annotations

import mimetypes
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from gateway.appkeys import READ_POOL
from gateway.auth import public
from gateway.errors import ApiError
from ledger import events as ev
from ledger.events import RecordedEvent
from ledger.postgres.queries import recent_events

routes = web.RouteTableDef()
STATIC = Path(__file__).resolve().parent / "static"
# Scripts, styles and data from this origin only: no inline script or style, no
# framing, no other hosts (uPlot is vendored; the page works offline).
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": _CSP,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_encoder = msgspec.json.Encoder(decimal_format="number")


@routes.get("/ui")
@public
async def index(request: web.Request) -> web.Response:
    return web.Response(body=(STATIC / "index.html").read_bytes(), content_type="text/html", headers=_HEADERS)


@routes.get("/ui/static/{path:.+}")
@public
async def static(request: web.Request) -> web.Response:
    path = (STATIC / request.match_info["path"]).resolve()
    if not path.is_relative_to(STATIC) or not path.is_file():  # no way out of the static folder
        raise ApiError(404, "no such file", type="not_found_error", param="path")
    kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    return web.Response(body=path.read_bytes(), content_type=kind, headers=_HEADERS)


def usd(amount: Decimal | None) -> str:
    """Money as the dashboard shows it: 2 decimals from $1, three significant digits below."""
    if amount is None:
        return "—"
    a = abs(amount)
    if a == 0:
        return "$0.00"
    if a >= 1:
        text = f"{a:,.2f}"
    else:
        digits = min(9, max(2, 2 - a.adjusted()))
        head, tail = f"{a:.{digits}f}".split(".")
        text = head + "." + tail[:2] + tail[2:].rstrip("0")
    return ("-$" if amount < 0 else "$") + text


def _describe(alert: ev.Event) -> str:
    if isinstance(alert, ev.BudgetForecastExceeded):
        return (
            f"forecast when raised: runs out {alert.predicted_at:%Y-%m-%d %H:%M} UTC, before the reset "
            f"({usd(alert.spend)} of {usd(alert.max_budget)} spent then)"
        )
    assert isinstance(alert, ev.BudgetThresholdCrossed)
    if alert.kind == "soft_budget":
        return f"soft budget {usd(alert.soft_budget)} reached ({usd(alert.spend)} spent)"
    return f"{alert.threshold:.0%} of {usd(alert.max_budget)} reached ({usd(alert.spend)} spent)"


@routes.get("/alerts")
async def alerts(request: web.Request) -> web.Response:
    """The newest budget alerts (admin key)."""
    raw = request.query.get("limit", "50")
    if not raw.isdigit() or not 1 <= int(raw) <= 500:
        raise ApiError(400, "limit must be between 1 and 500", param="limit")
    rows = await recent_events(request.app[READ_POOL], list(ev.ALERT_TYPES), int(raw))
    out: list[dict[str, Any]] = []
    for r in rows:
        event = ev.decode(RecordedEvent(r[0], r[1], r[2], r[3], r[4], r[5]))
        assert isinstance(event, ev.BudgetThresholdCrossed | ev.BudgetForecastExceeded)
        out.append(
            {
                "position": r[0],
                "type": r[3],
                "recorded_at": r[5],
                "tag": event.tag,
                "window_start": event.window_start,
                "description": _describe(event),
            }
        )
    return web.Response(body=_encoder.encode(out), content_type="application/json")
