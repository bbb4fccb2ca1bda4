"""The dashboard in a real headless Chromium, driven by Playwright."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from gateway.keys import BUDGET_BOOK
from tests.conftest import projected
from tests.test_proxy import ADMIN_KEY, CHAT, Gateway, gateway

__all__ = ["gateway"]  # the fixture, imported for this module
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"

if not Path(CHROMIUM).exists() and not os.environ.get("CI"):
    pytest.skip("Debian's chromium is not installed (.ci/run installs it)", allow_module_level=True)


async def test_dashboard_shows_budgets_chart_and_alerts(gateway: Gateway) -> None:
    from playwright.async_api import async_playwright

    gw = gateway
    await gw.budget("team:search", "0.00005")
    await gw.budget("team:ads", "1")
    await gw.app[BUDGET_BOOK].refresh()
    sdk = gw.sdk()
    for i in range(6):
        await sdk.chat.completions.create(
            **CHAT,
            max_tokens=20,
            user=f"user{i % 2}@example.com",
            extra_body={
                "tags": ["team:search" if i % 2 else "team:ads"],
                "metadata": {"spend_logs_metadata": {"customer": f"c{i % 3}"}},
            },
        )
    await projected(gw.app)

    async with async_playwright() as p:
        browser = await p.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 1100})
            await page.goto(f"{gw.url}/ui")
            await page.fill("#key", ADMIN_KEY)
            await page.click("#login button")
            await page.wait_for_selector("#tags tbody tr", timeout=15000)
            await page.wait_for_selector("#chart canvas", timeout=15000)
            rows = await page.locator("#tags tbody tr").all_inner_texts()
            assert any("team:search" in r for r in rows)
            assert any("team:ads" in r for r in rows)
            search = next(r for r in rows if "team:search" in r)
            percent = int(search.split("%")[0].split()[-1])
            assert percent > 50  # the bar shows the share of the budget spent
            assert await page.locator("#users tbody tr").count() == 2
            assert "c0" in await page.locator("#meta tbody").inner_text()
            # the key lives in session storage, never in the URL
            assert ADMIN_KEY not in page.url
            assert await page.evaluate("sessionStorage.getItem('ledger-admin-key')") == ADMIN_KEY
            ARTIFACTS.mkdir(exist_ok=True)
            await page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        finally:
            await browser.close()
