"""Budget alerts: exactly once, soft budgets, forecasts, and webhook delivery."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from ledger import events as ev
from ledger.alerts import forecast
from ledger.events import RecordedEvent
from ledger.postgres.store import EventStore
from ledger.settings import WebhookConfig
from ledger.tags import TagService
from projections.alerts import Alerts
from projections.notify import Notifier
from projections.runtime import Worker

DAY = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


async def spend(store: EventStore, i: int, tag: str, cost: str, at: datetime) -> None:
    event = ev.SpendRecorded(
        request_id=f"s{tag}{i}", admitted_at=at, cost=Decimal(cost), tags=[tag], budget_tags=[tag]
    )
    await store.append(f"request:s{tag}{i}", None, [ev.to_new(event)])


async def alerts_of(store: EventStore, kind: str = "BudgetThresholdCrossed") -> list[Any]:
    return [ev.decode(r) for r in await store.read_types([kind], 0, 1000)]


async def all_events(store: EventStore) -> list[RecordedEvent]:
    return await store.read_all(0, 100_000)


async def test_thresholds_cross_exactly_once_under_concurrency_and_replay(store: EventStore) -> None:
    tags = TagService(store)
    await tags.create(
        "t", ev.TagFields(max_budget=Decimal(1), budget_duration="1d", soft_budget=Decimal("0.3"))
    )
    for i in range(12):
        await spend(store, i, "t", "0.1", DAY + timedelta(minutes=10 * i))
    events = await all_events(store)
    relevant = [e for e in events if e.type in Alerts.types]

    async def one_process() -> None:
        projection = Alerts(store)
        async with store.pool.acquire() as conn:
            await projection.apply(conn, relevant, {})

    # four workers racing on their own connections in this process (four real
    # processes, the active one killed: tests/faults/test_alerts_cluster.py)
    await asyncio.gather(*(one_process() for _ in range(4)))
    crossed = await alerts_of(store)
    kinds = sorted((a.kind, a.threshold) for a in crossed)
    assert kinds == [
        ("soft_budget", None),
        ("threshold", Decimal("0.5")),
        ("threshold", Decimal("0.8")),
        ("threshold", Decimal("1.0")),
    ]
    threshold_half = next(a for a in crossed if a.threshold == Decimal("0.5"))
    assert threshold_half.spend == Decimal("0.5")
    # a replay applies the same events again: nothing new
    await one_process()
    assert len(await alerts_of(store)) == 4


async def test_soft_budget_alerts_without_blocking(store: EventStore, redis_url: str) -> None:
    from ledger.admission import Admission, Admitted
    from ledger.budgets import BudgetBook
    from ledger.counters import Counters, connect_redis

    tags = TagService(store)
    await tags.create(
        "soft",
        ev.TagFields(
            max_budget=Decimal(10),
            budget_duration="1d",
            soft_budget=Decimal("0.2"),
            alert_thresholds=[Decimal("0.9")],
        ),
    )
    book = BudgetBook(store)
    await book.refresh()
    client = connect_redis(redis_url)
    counters = Counters(client, store.pool)
    admission = Admission(store, counters, book)
    worker = Worker(store, Alerts(store), poll_interval_s=0.1)
    task = asyncio.create_task(worker.run())
    try:
        for i in range(6):
            a = await admission.admit(f"soft-{i}", ["soft"], Decimal("0.1"))
            assert isinstance(a, Admitted)  # past the soft budget, still admitted
            await admission.record_spend(a, Decimal("0.1"))
        deadline = time.monotonic() + 10
        while not (found := await alerts_of(store)):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        task.cancel()
        await counters.close()
        await client.aclose()
    assert [a.kind for a in found] == ["soft_budget"]


def test_forecast_of_a_synthetic_burn_is_within_5_percent() -> None:
    start, reset = DAY, DAY + timedelta(days=1)
    # $1 budget burned at $1/72 every 10 minutes runs out at 12:00
    for n in (6, 10, 30):
        now = start + timedelta(minutes=10 * n)
        predicted = forecast(Decimal(1) / 72 * n, Decimal(1), start, reset, now)
        assert predicted is not None
        error = abs((predicted - (start + timedelta(hours=12))).total_seconds())
        assert error <= 0.05 * 12 * 3600
    assert (
        forecast(Decimal("0.01"), Decimal(1), start, reset, start + timedelta(hours=12)) is None
    )  # slow burn
    # a very slow burn on a big budget lasts past the reset (and must not overflow a datetime)
    assert forecast(Decimal("0.00001"), Decimal(1000), start, reset, start + timedelta(hours=12)) is None


async def test_forecast_alert_once_per_window(store: EventStore) -> None:
    tags = TagService(store)
    await tags.create(
        "burn", ev.TagFields(max_budget=Decimal(1), budget_duration="1d", alert_thresholds=[Decimal(5)])
    )
    for i in range(10):
        await spend(store, i, "burn", str(Decimal(1) / 72), DAY + timedelta(minutes=10 * (i + 1)))
    relevant = [e for e in await all_events(store) if e.type in Alerts.types]
    async with store.pool.acquire() as conn:
        await Alerts(store).apply(conn, relevant, {})
    [alert] = await alerts_of(store, "BudgetForecastExceeded")
    expected = DAY + timedelta(hours=12)
    assert abs((alert.predicted_at - expected).total_seconds()) <= 0.05 * 12 * 3600
    assert alert.reset_at == DAY + timedelta(days=1)


class Receiver:
    def __init__(self, fail_first: int = 0, hang: bool = False) -> None:
        self.fail_first = fail_first
        self.hang = hang
        self.calls = 0
        self.received: list[tuple[bytes, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.read()
        if self.hang:
            await asyncio.sleep(30)
        if self.calls <= self.fail_first:
            return web.Response(status=503)
        self.received.append((body, request.headers.get("X-Ledger-Signature", "")))
        return web.Response(status=204)


@pytest.fixture
async def alert_in_log(store: EventStore) -> None:
    tags = TagService(store)
    await tags.create(
        "hooked", ev.TagFields(max_budget=Decimal(1), budget_duration="1d", alert_thresholds=[Decimal("0.5")])
    )
    for i in range(6):
        await spend(store, i, "hooked", "0.1", DAY + timedelta(minutes=i))
    relevant = [e for e in await all_events(store) if e.type in Alerts.types]
    async with store.pool.acquire() as conn:
        await Alerts(store).apply(conn, relevant, {})


async def run_notifier(store: EventStore, webhook: WebhookConfig, secret: bytes, seconds: float) -> Worker:
    worker = Worker(store, Notifier(store, webhook, secret, base_delay_s=0.05), poll_interval_s=0.1)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(seconds)
    task.cancel()
    return worker


async def test_webhook_delivery_signed_retried_and_isolated(
    store: EventStore, aiohttp_server: AiohttpServer, alert_in_log: None
) -> None:
    flaky, hanging = Receiver(fail_first=3), Receiver(hang=True)
    servers = []
    for receiver in (flaky, hanging):
        app = web.Application()
        app.router.add_post("/hook", receiver.handle)
        servers.append(await aiohttp_server(app))
    secret = b"s" * 32
    slow = WebhookConfig("hangs", str(servers[1].make_url("/hook")), timeout_s=0.3, max_attempts=2)
    ok = WebhookConfig("flaky", str(servers[0].make_url("/hook")), format="slack", max_attempts=5)
    started = time.monotonic()
    await asyncio.gather(run_notifier(store, slow, secret, 3.0), run_notifier(store, ok, secret, 3.0))
    assert time.monotonic() - started < 5
    # two alerts (the 50% threshold and the forecast); the flaky receiver failed
    # three times on the first, then got each exactly once
    assert len(flaky.received) == 2
    for body, signature in flaky.received:
        at = signature.split(",")[0].removeprefix("t=")
        expected = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
        assert signature == f"t={at},v1={expected}"
    payloads = [msgspec.json.decode(body) for body, _ in flaky.received]
    threshold = next(p for p in payloads if p["alert"]["type"] == "threshold")
    assert "hooked reached 50%" in threshold["text"]
    assert threshold["alert"]["tag"] == "hooked"
    assert threshold["alert"]["threshold"] == "0.5"  # money and fractions as exact decimal strings
    assert any(p["alert"]["type"] == "forecast" and p["alert"]["forecast"] for p in payloads)
    deliveries = [
        ev.decode(r) for r in await store.read_types(["AlertDelivered", "AlertDeliveryFailed"], 0, 100)
    ]
    flaky_ok = [d for d in deliveries if d.webhook == "flaky" and isinstance(d, ev.AlertDelivered)]
    flaky_failed = [d for d in deliveries if d.webhook == "flaky" and isinstance(d, ev.AlertDeliveryFailed)]
    assert sorted(d.alert_position for d in flaky_ok) == sorted({d.alert_position for d in flaky_ok})
    assert len(flaky_ok) == 2
    assert len(flaky_failed) == 3
    hang_failed = [d for d in deliveries if d.webhook == "hangs"]
    assert [d.final for d in hang_failed] == [False, True, False, True]  # gave up on each, recorded
