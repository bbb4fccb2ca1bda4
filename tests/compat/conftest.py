"""The LiteLLM compatibility suite: LiteLLM's documented request bodies, sent over
HTTP to the real gateway (real PostgreSQL, Redis and the mock upstream), and
LiteLLM's documented response shapes asserted on the answers.

The bodies and shapes are written from LiteLLM's docs and Pydantic models
(``litellm/types/tag_management.py``, ``litellm/proxy/_types.py``,
``types/proxy/management_endpoints/common_daily_activity.py``): field names,
nesting and types, not LiteLLM's code.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import msgspec
import pytest

from ledger.settings import Settings
from tests.conftest import projected
from tests.test_proxy import ADMIN_KEY, Gateway, gateway

__all__ = ["LiteLLM", "gateway", "litellm"]


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """A gateway configured as a team coming from LiteLLM configures it: keys made
    without allowed_tags may carry any tag, as LiteLLM's do (LEDGER_KEY_SCOPE_DEFAULT=any)."""
    return msgspec.structs.replace(settings, key_scope_default="any")


@dataclass
class LiteLLM:
    """Calls the gateway as a LiteLLM user's script would: master key, JSON bodies."""

    gw: Gateway
    session: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None, **params: Any) -> tuple[int, Any]:
        async with self.session.request(
            method,
            f"{self.gw.url}{path}",
            json=body,
            params=params or None,
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        ) as r:
            return r.status, await r.json(content_type=None)

    async def post(self, path: str, body: Any) -> Any:
        status, data = await self.call("POST", path, body)
        assert status == 200, (path, status, data)
        return data

    async def get(self, path: str, **params: Any) -> Any:
        status, data = await self.call("GET", path, **params)
        assert status == 200, (path, status, data)
        return data

    async def chat(self, key: str | None = None, **kw: Any) -> Any:
        """One chat completion through the gateway with the openai SDK."""
        sdk = self.gw.sdk(api_key=key) if key else self.gw.sdk()
        kw.setdefault("model", "gpt-4o-mini")
        kw.setdefault("messages", [{"role": "user", "content": "hello"}])
        kw.setdefault("max_tokens", 20)
        return await sdk.chat.completions.with_raw_response.create(**kw)

    async def settled(self) -> None:
        """Wait for the projection workers to apply everything logged so far."""
        await projected(self.gw.app)


@pytest.fixture
async def litellm(gateway: Gateway) -> AsyncIterator[LiteLLM]:
    async with aiohttp.ClientSession() as session:
        yield LiteLLM(gateway, session)


# LiteLLM's SpendMetrics (types/proxy/management_endpoints/common_daily_activity.py)
SPEND_METRICS = {
    "spend",
    "prompt_tokens",
    "completion_tokens",
    "cache_read_input_tokens",
    "cache_creation_input_tokens",
    "total_tokens",
    "successful_requests",
    "failed_requests",
    "api_requests",
}
# LiteLLM's DailySpendMetadata
DAILY_METADATA = {
    "total_spend",
    "total_prompt_tokens",
    "total_completion_tokens",
    "total_tokens",
    "total_api_requests",
    "total_successful_requests",
    "total_failed_requests",
    "total_cache_read_input_tokens",
    "total_cache_creation_input_tokens",
    "page",
    "total_pages",
    "has_more",
}


def assert_daily_activity(body: dict[str, Any]) -> None:
    """LiteLLM's SpendAnalyticsPaginatedResponse: {results: [DailySpendData], metadata}."""
    assert set(body) >= {"results", "metadata"}
    assert set(body["metadata"]) >= DAILY_METADATA
    for day in body["results"]:
        assert set(day) >= {"date", "metrics", "breakdown"}
        assert len(day["date"]) == 10  # YYYY-MM-DD
        assert set(day["metrics"]) >= SPEND_METRICS
        assert set(day["breakdown"]) >= {"models", "providers", "api_keys", "entities", "model_groups"}
        for group in ("models", "providers", "entities", "model_groups"):
            for metric in day["breakdown"][group].values():
                assert set(metric) >= {"metrics", "metadata", "api_key_breakdown"}
                assert set(metric["metrics"]) >= SPEND_METRICS
        for per_key in day["breakdown"]["api_keys"].values():
            assert set(per_key) == {"metrics", "metadata"}
            assert set(per_key["metadata"]) >= {"key_alias", "team_id"}
