"""Alert delivery: one worker per webhook, each with its own checkpoint.

A worker posts every alert after its checkpoint to its webhook (JSON, or a
Slack-compatible ``{"text": ...}``), signed Stripe-style with
``X-Ledger-Signature: t=<unix time>,v1=<hex HMAC-SHA256 of "<t>." + body>``
(a receiver refuses a t older than ``SIGNATURE_TOLERANCE_S``, so a captured
delivery cannot be replayed later), retrying with exponential backoff and
jitter up to ``max_attempts``; every attempt's outcome is an event. Redirects
are never followed: a 3xx is a failed attempt (a redirect would re-send the
signed body wherever the receiver, or whoever controls it, points). Because
each webhook has its own worker and checkpoint, a dead or hanging endpoint only
ever delays itself. After a crash a worker starts again at its checkpoint (an
alert whose success was not yet recorded may be posted twice: receivers get
``alert_id`` to de-duplicate).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
import asyncpg
import msgspec
import structlog

from ledger import events as ev
from ledger.events import RecordedEvent
from ledger.postgres.store import EventStore
from ledger.settings import WebhookConfig
from projections.runtime import Projection

log = structlog.get_logger(__name__)
_encoder = msgspec.json.Encoder()


def payload(alert: ev.AlertEvent, alert_id: int, fmt: str) -> dict[str, Any]:
    if isinstance(alert, ev.BudgetForecastExceeded):
        body: dict[str, Any] = {
            "type": "forecast",
            "tag": alert.tag,
            "window_start": alert.window_start,
            "reset_at": alert.reset_at,
            "threshold": None,
            "spend": alert.spend,
            "max_budget": alert.max_budget,
            "forecast": alert.predicted_at,
        }
        text = (
            f"Budget forecast for {alert.tag}: ${alert.spend} of ${alert.max_budget} spent; at this rate "
            f"it runs out at {alert.predicted_at:%Y-%m-%d %H:%M} UTC, before it resets at "
            f"{alert.reset_at:%Y-%m-%d %H:%M} UTC"
        )
    else:
        body = {
            "type": alert.kind,
            "tag": alert.tag,
            "window_start": alert.window_start,
            "reset_at": alert.reset_at,
            "threshold": alert.threshold,
            "spend": alert.spend,
            "max_budget": alert.max_budget,
            "soft_budget": alert.soft_budget,
            "forecast": None,
        }
        what = "soft budget" if alert.kind == "soft_budget" else f"{alert.threshold:.0%} of its budget"
        text = f"Tag {alert.tag} reached {what}: ${alert.spend} of ${alert.max_budget} this window"
    body["alert_id"] = alert_id
    return {"text": text, "alert": body} if fmt == "slack" else body


SIGNATURE_HEADER = "X-Ledger-Signature"
# How old a signature's t may be when the receiver checks it (Stripe's default);
# documented in the README with the verification snippet.
SIGNATURE_TOLERANCE_S = 300


def sign(secret: bytes, body: bytes, at: int) -> str:
    """The signature header's value for ``body`` sent at unix time ``at``."""
    mac = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={at},v1={mac}"


class Notifier(Projection):
    types = frozenset(ev.ALERT_TYPES)
    tables = ()

    def __init__(
        self, store: EventStore, webhook: WebhookConfig, secret: bytes, *, base_delay_s: float = 0.5
    ):
        self.store = store
        self.webhook = webhook
        self.secret = secret
        self.base_delay_s = base_delay_s
        self.name = f"notify:{webhook.name}"

    async def apply(
        self, conn: asyncpg.Connection, events: list[RecordedEvent], tables: Mapping[str, str]
    ) -> None:
        timeout = aiohttp.ClientTimeout(total=self.webhook.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for r in events:
                alert = ev.decode(r)
                assert isinstance(alert, ev.BudgetThresholdCrossed | ev.BudgetForecastExceeded)
                if self.webhook.tags and alert.tag not in self.webhook.tags:
                    continue
                await self._deliver(session, r.position, alert)

    async def _deliver(self, session: aiohttp.ClientSession, position: int, alert: ev.AlertEvent) -> None:
        stream = f"delivery:{self.webhook.name}:{position}"
        done = [ev.decode(e) for e in await self.store.read_stream(stream)]
        if any(isinstance(d, ev.AlertDelivered) for d in done):
            return  # delivered before a crash moved the checkpoint
        body = _encoder.encode(payload(alert, position, self.webhook.format))
        for attempt in range(1, self.webhook.max_attempts + 1):
            # signed afresh for each attempt, so a late retry is inside the tolerance
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign(self.secret, body, int(time.time())),
            }
            try:
                async with session.post(
                    self.webhook.url, data=body, headers=headers, allow_redirects=False
                ) as resp:
                    status = resp.status
                error = f"HTTP {status}"
                if 300 <= status < 400:
                    error += " (a redirect, not followed)"
            except (aiohttp.ClientError, TimeoutError) as e:
                status, error = 0, f"{type(e).__name__}: {e}"
            if 200 <= status < 300:
                event: ev.Event = ev.AlertDelivered(position, self.webhook.name, attempt, status)
                await self.store.append(stream, None, [ev.to_new(event)])
                return
            final = attempt == self.webhook.max_attempts
            failed = ev.AlertDeliveryFailed(position, self.webhook.name, attempt, error, final)
            await self.store.append(stream, None, [ev.to_new(failed)])
            log.warning("alert_delivery_failed", webhook=self.webhook.name, attempt=attempt, error=error)
            if not final:
                await asyncio.sleep(self.base_delay_s * 2 ** (attempt - 1) * random.uniform(0.5, 1.5))
