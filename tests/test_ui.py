"""The dashboard in a real headless Chromium (Debian's), driven by Playwright.

Empty state, data state with a blocked tag, the tag view, narrow viewports, a
browser in America/Los_Angeles (day buckets stay UTC days), and the chart's
numbers against the JSON API's. Screenshots go to tests/artifacts/."""

from __future__ import annotations

import os
import shutil
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest

from ledger import events as ev
from tests.conftest import projected
from tests.test_proxy import ADMIN_KEY, CHAT, Gateway, gateway

__all__ = ["gateway"]  # the fixture, imported for this module
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    from playwright.async_api import async_playwright

    async with async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            yield b
        finally:
            await b.close()


class Page:
    """A signed-in dashboard tab that records console errors and CSP violations."""

    def __init__(self, page: Any) -> None:
        self.page = page
        self.problems: list[str] = []
        page.on("console", lambda m: self.problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.problems.append(str(e)))

    @classmethod
    async def open(cls, browser: Any, url: str, *, width: int = 1400, tz: str | None = None) -> Page:
        context = await browser.new_context(viewport={"width": width, "height": 900}, timezone_id=tz)
        tab = cls(await context.new_page())
        await tab.page.goto(f"{url}/ui")
        await tab.page.fill("#key", ADMIN_KEY)
        await tab.page.click("#login button")
        await tab.page.wait_for_selector("body[data-loaded=overview]", timeout=20000)
        return tab

    async def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        await self.page.screenshot(path=str(ARTIFACTS / name), full_page=True)

    async def text(self, selector: str) -> str:
        return str(await self.page.locator(selector).inner_text())

    async def fits(self) -> None:
        """Nothing sticks out sideways: the page never scrolls horizontally."""
        overflow = await self.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth"
        )
        assert overflow <= 0, f"the page is {overflow}px too wide"

    async def legend(self, chart: str) -> dict[str, str]:
        rows = await self.page.locator(f"{chart} .u-legend .u-series").all()
        out = {}
        for row in rows:
            label = (await row.locator(".u-label").inner_text()).strip()
            out[label] = (await row.locator(".u-value").inner_text()).strip()
        return out

    async def hover_day(self, chart: str, index: int, days: int) -> None:
        box = await self.page.locator(f"{chart} .u-over").bounding_box()
        assert box is not None
        await self.page.mouse.move(
            box["x"] + box["width"] * (index + 0.5) / days, box["y"] + box["height"] / 2
        )


async def api(gw: Gateway, path: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(gw.url + path, headers=AUTH) as r:
        assert r.status == 200, await r.text()
        return await r.json()


def money(v: Decimal) -> str:
    """The dashboard's money format: 2 decimals from $1, three significant digits below."""
    a = abs(v)
    if a == 0:
        return "$0.00"
    if a >= 1:
        return f"${a:,.2f}"
    digits = min(9, max(2, 2 - a.adjusted()))
    text = f"{a:.{digits}f}"
    head, tail = text.split(".")
    return f"${head}.{tail[:2] + tail[2:].rstrip('0')}"


async def test_empty_dashboard_teaches_the_next_command(gateway: Gateway, browser: Any) -> None:
    context = await browser.new_context(viewport={"width": 1400, "height": 900})
    page = await context.new_page()
    await page.goto(f"{gateway.url}/ui")
    hint = await page.locator("#login").inner_text()
    assert ".data/admin_key" in hint  # where to find the key
    assert "ledger dev" in hint
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "dashboard-login.png"))
    await context.close()

    tab = await Page.open(browser, gateway.url)
    assert "curl -s -XPOST" in await tab.text("#tags-empty")  # how to make a budget
    assert "/tag/new" in await tab.text("#tags-empty")
    assert ".data/demo_key" in await tab.text("#chart-empty")  # how to send a request
    assert await tab.page.locator("#chart canvas").count() == 0  # no empty axes of $0.000001
    assert "no budget refused" in await tab.text("#denials-empty")
    assert "alert_thresholds" in await tab.text("#alerts-empty")
    assert "$0.00" in await tab.text("#cards")
    assert "UTC" in await tab.text("#updated")
    await tab.shot("dashboard-empty.png")
    assert tab.problems == []


async def earlier_spend(gw: Gateway, at: datetime, cost: str, model: str, tags: list[str]) -> None:
    """A request from an earlier day, as the log holds it: the gateway only ever
    records "now", so the history is written to the log directly (with the time
    it happened); the projection workers then treat it like any other."""
    request_id = uuid.uuid4().hex
    admitted = ev.to_new(
        ev.RequestAdmitted(request_id, at, Decimal(cost), at + timedelta(minutes=10), tags=tags, model=model)
    )
    spent = ev.to_new(
        ev.SpendRecorded(request_id, at, Decimal(cost), tags=tags, model=model, provider="mock", status=200)
    )
    await gw.store.pool.executemany(
        "insert into events (stream, version, type, data, recorded_at) values ($1, $2, $3, $4::jsonb, $5)",
        [
            (f"request:{request_id}", 1, admitted.type, admitted.data.decode(), at),
            (f"request:{request_id}", 2, spent.type, spent.data.decode(), at),
        ],
    )


async def traffic(gw: Gateway) -> None:
    """A morning's worth: overlapping tags, models (one unpriced), users, metadata, a
    soft budget passed, and a tight budget that ends up refusing requests."""
    await gw.budget("team:tight", "0.00005")
    await gw.budget("team:search", "2", soft_budget=Decimal("0.0001"))
    await gw.budget("team:ads", "5")
    sdk = gw.sdk()
    plan = [
        (["team:search", "app:bot"], "gpt-4o-mini"),
        (["team:search"], "gpt-4o"),
        (["team:ads", "app:bot"], "gpt-4o-mini"),
        (["team:ads"], "gpt-4o"),
        (["app:bot"], "house-model-x"),  # no known price
        (["team:search", "team:ads"], "gpt-4o-mini"),
    ]
    for i, (tags, model) in enumerate(plan * 2):
        await sdk.chat.completions.create(
            model=model,
            messages=CHAT["messages"],
            max_tokens=20,
            user=f"user{i % 3}@example.com",
            extra_body={"tags": tags, "metadata": {"spend_logs_metadata": {"customer": f"cust-{i % 2}"}}},
        )
    refused = 0
    for _ in range(10):
        try:
            await sdk.chat.completions.create(**CHAT, max_tokens=20, extra_body={"tags": ["team:tight"]})
        except openai.RateLimitError:
            refused += 1
    assert refused >= 1
    # Three days ago at 02:30 UTC: still the evening before in Los Angeles. Its bar
    # must stand on the UTC day, whatever the browser's zone.
    early = datetime.now(UTC).replace(hour=2, minute=30, second=0, microsecond=0) - timedelta(days=3)
    await earlier_spend(gw, early, "0.0125", "gpt-4o", ["team:ads"])
    await earlier_spend(gw, early + timedelta(hours=20), "0.0031", "gpt-4o-mini", ["team:search", "app:bot"])
    await projected(gw.app)


async def test_dashboard_with_traffic(gateway: Gateway, browser: Any) -> None:
    gw = gateway
    await traffic(gw)
    ov = await api(gw, "/ui/api/overview")
    today = datetime.now(UTC).date()
    start = today - timedelta(days=29)
    report = await api(gw, f"/spend/report?group_by=model&interval=day&start_date={start}&end_date={today}")
    per_day: dict[str, Decimal] = defaultdict(Decimal)
    per_model: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in report["rows"]:
        per_day[r["period"]] += Decimal(str(r["spend"]))
        per_model[(r["period"], r["group"] or "(swept)")] += Decimal(str(r["spend"]))

    tab = await Page.open(browser, gw.url)
    page = tab.page
    await page.wait_for_selector("#chart canvas")

    # top-line cards: the API's numbers, money formatted one way
    cards = await tab.text("#cards")
    assert money(Decimal(str(ov["today"]["spend"]))) in cards
    assert f"{ov['today']['requests']} requests" in cards
    assert f"{ov['today']['denials']} denied" in cards
    assert "1 tag blocked now" in cards

    # the blocked tag is unmistakable; the soft budget is marked; dollars, not only percentages
    blocked = page.locator("#tags tbody tr", has_text="team:tight")
    assert await blocked.locator(".pill").inner_text() == "BLOCKED"
    red = await blocked.locator(".pill").evaluate("e => getComputedStyle(e).backgroundColor")
    assert red == "rgb(217, 45, 32)"
    assert "of $0.00005" in await blocked.inner_text()
    search = page.locator("#tags tbody tr", has_text="team:search")
    assert await search.locator(".pill").inner_text() == "over soft budget"
    assert await search.locator(".bar .soft").count() == 1
    assert "of $2.00" in await search.inner_text()
    headers = await page.locator("#tags thead th").all_inner_texts()
    assert all(h.strip() for h in headers)  # no blank column header
    align = await page.locator("#tags thead th.num").first.evaluate("e => getComputedStyle(e).textAlign")
    assert align == "right"

    # the chart: one bar per UTC day of the range, each request once, equal to the API's numbers
    drawn = await page.evaluate("window.ledgerDashboard.drawn.overview")
    assert drawn["days"] == [str(start + timedelta(days=i)) for i in range(30)]
    assert {
        d: Decimal(str(v)) for d, v in zip(drawn["days"], drawn["total"]["values"], strict=True) if v
    } == {d: v for d, v in per_day.items() if v}
    for stack in drawn["stacks"]:
        for d, v in zip(drawn["days"], stack["values"], strict=True):
            assert Decimal(str(v)) == per_model.get((d, stack["label"]), Decimal(0)), (d, stack["label"])
    # hovering today shows that day's own values (not running totals), labelled as a UTC day
    await tab.hover_day("#chart", 29, 30)
    legend = await tab.legend("#chart")
    assert legend["Day"] == f"{today:%b} {today.day}, {today.year} UTC"
    assert legend["total"] == money(per_day[str(today)])
    for stack in drawn["stacks"]:
        assert legend[stack["label"]] == money(per_model[(str(today), stack["label"])])

    # denials say why; alerts are listed
    denial = page.locator("#denials tbody tr").first
    assert "team:tight" in await denial.inner_text()
    assert "for this request > $0.00005 budget" in await denial.inner_text()
    # every alert the API lists is rendered, in its order, with its tag and words
    # (catches an alerts table left empty or stale: planted once, renderAlerts skipped)
    alerts = await api(gw, "/alerts?limit=20")
    rows = await page.locator("#alerts tbody tr").all_inner_texts()
    assert len(rows) == len(alerts) > 0
    for row, alert in zip(rows, alerts, strict=True):
        assert alert["tag"] in row
        assert alert["description"] in row
    assert await page.locator("#alerts tbody tr", has_text="team:tight").count() >= 1
    assert "UTC" in await tab.text("#alerts tbody tr td >> nth=0")
    assert await page.locator("#users tbody tr").count() == 3
    assert "cust-0" in await tab.text("#meta tbody")
    # the bill by team: the split rows the API gives, each against the period before, one biggest mover
    bill = await api(
        gw, f"/spend/report?group_by=tag:team&interval=month&start_date={start}&end_date={today}"
    )
    charged = [g for g in bill["groups"] if Decimal(str(g["spend"])) != 0]
    assert {g["group"] for g in charged} >= {"search", "ads", "tight"}
    assert sum(Decimal(str(g["spend"])) for g in bill["groups"]) == Decimal(str(bill["total"]))
    assert await page.locator("#bill tbody tr").count() == len(charged)
    search_row = await page.locator("#bill tbody tr", has_text="search").inner_text()
    assert money(Decimal(str(next(g for g in charged if g["group"] == "search")["spend"]))) in search_row
    assert await page.locator("#bill .mover").count() == 1
    await tab.shot("dashboard.png")

    # per tag, with the overlap said out loud
    await page.select_option("#mode", "tag")
    await page.wait_for_function("() => window.ledgerDashboard.drawn.overview.lines.length > 0")
    assert "Tags overlap" in await tab.text("#chart-note")
    drawn = await page.evaluate("window.ledgerDashboard.drawn.overview")
    tags = await api(gw, f"/spend/tags?start_date={start}&end_date={today}")
    for line in drawn["lines"]:
        [row] = [t for t in tags if t["tag"] == line["label"]]
        assert sum(Decimal(str(v)) for v in line["values"]) == Decimal(str(row["spend"]))
    await tab.shot("dashboard-by-tag.png")
    await page.select_option("#mode", "model")

    # one tag: budget, history, spend by model and user, denials with reasons
    await page.click("#tags a:text-is('team:tight')")
    await page.wait_for_selector("body[data-loaded=tag]")
    await page.wait_for_selector("#tag-history tbody tr")
    assert await tab.text("#tag-name") == "team:tight"
    assert await tab.text("#tag-status .pill") == "BLOCKED"
    assert "$0.00005" in await tab.text("#tag-cards")
    assert "per UTC day" in await tab.text("#tag-def")
    history = await tab.text("#tag-history tbody")
    assert "created" in history
    assert "max_budget = $0.00005" in history
    assert "budget_duration = 1d" in history
    assert await page.locator("#tag-denials tbody tr").count() >= 1
    detail = await api(gw, "/ui/api/tag?name=team:tight")
    models = await page.locator("#tag-models tbody tr").all_inner_texts()
    assert len(models) == len(detail["by_model"])
    tag_drawn = await page.evaluate("window.ledgerDashboard.drawn.tag")
    activity = await api(
        gw, f"/tag/daily/activity?tags=team:tight&start_date={start}&end_date={today}&page_size=1000"
    )
    assert sum(Decimal(str(v)) for s in tag_drawn["stacks"] for v in s["values"]) == sum(
        Decimal(str(day["metrics"]["spend"])) for day in activity["results"]
    )
    await tab.shot("dashboard-tag.png")
    # a tag that only labels spend has no definition: said plainly, no error
    await page.goto(f"{gw.url}/ui#tag=app:bot")
    await page.wait_for_selector("body[data-loaded=tag]")
    await page.wait_for_function("() => document.querySelector('#tag-name').textContent === 'app:bot'")
    assert "no definition" in await tab.text("#tag-cards")
    assert "unpriced" in await tab.text("#tag-models")
    assert await page.locator("#error").is_hidden()
    assert tab.problems == []

    # narrow screens: everything fits, the grids collapse, the chart stays in its card
    for width in (760, 360):
        narrow = await Page.open(browser, gw.url, width=width)
        await narrow.page.wait_for_selector("#chart canvas")
        await narrow.fits()
        chart_w = await narrow.page.locator("#chart canvas").evaluate("e => e.getBoundingClientRect().width")
        panel_w = await narrow.page.locator("#chart").evaluate("e => e.getBoundingClientRect().width")
        assert chart_w <= panel_w + 1
        await narrow.shot(f"dashboard-{width}.png")
        await narrow.page.goto(f"{gw.url}/ui#tag=team:tight")
        await narrow.page.wait_for_selector("#tag-history tbody tr")
        await narrow.fits()
        await narrow.shot(f"dashboard-tag-{width}.png")
        assert narrow.problems == []
        await narrow.page.context.close()

    # a browser in Los Angeles still sees UTC days: same days, same values, UTC labels
    la = await Page.open(browser, gw.url, tz="America/Los_Angeles")
    await la.page.wait_for_selector("#chart canvas")
    assert await la.page.evaluate("Intl.DateTimeFormat().resolvedOptions().timeZone") == "America/Los_Angeles"
    la_drawn = await la.page.evaluate("window.ledgerDashboard.drawn.overview")
    assert la_drawn["days"][-1] == str(today)
    assert {
        d: Decimal(str(v)) for d, v in zip(la_drawn["days"], la_drawn["total"]["values"], strict=True) if v
    } == {d: v for d, v in per_day.items() if v}
    await la.hover_day("#chart", 29, 30)
    assert (await la.legend("#chart"))["Day"] == f"{today:%b} {today.day}, {today.year} UTC"
    early = today - timedelta(days=3)
    assert la_drawn["total"]["values"][26] == 0.0156  # both of that UTC day's requests, on that day
    await la.hover_day("#chart", 26, 30)
    legend = await la.legend("#chart")
    assert legend["Day"] == f"{early:%b} {early.day}, {early.year} UTC"
    assert legend["total"] == "$0.0156"
    assert legend["gpt-4o"] == "$0.0125"  # its own value, not a running sum
    assert legend["gpt-4o-mini"] == "$0.0031"
    assert (await la.text("#updated")).endswith("UTC")
    assert "UTC" in await la.text("#alerts tbody tr td >> nth=0")
    await la.shot("dashboard-los-angeles.png")
    assert la.problems == []
