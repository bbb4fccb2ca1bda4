"""What the request path enforces with the settings LiteLLM's admin API records:
each test states the behaviour a LiteLLM user expects, through the openai SDK."""

from __future__ import annotations

import openai

from tests.compat.conftest import LiteLLM


async def _status(litellm: LiteLLM, **kw: object) -> tuple[int, dict[str, object]]:
    try:
        await litellm.chat(**kw)
    except openai.APIStatusError as e:
        return e.status_code, e.body if isinstance(e.body, dict) else {}
    return 200, {}


async def test_tag_rpm_limit(litellm: LiteLLM) -> None:
    await litellm.post("/tag/new", {"name": "slow", "rpm_limit": 1})
    assert (await _status(litellm, extra_body={"metadata": {"tags": ["slow"]}}))[0] == 200
    status, error = await _status(litellm, extra_body={"metadata": {"tags": ["slow"]}})
    assert (status, error.get("type")) == (429, "rate_limit_exceeded")


async def test_key_budget(litellm: LiteLLM) -> None:
    made = await litellm.post("/key/generate", {"max_budget": 0.0000001, "budget_duration": "1d"})
    status, error = await _status(litellm, key=made["key"])
    assert (status, error.get("type")) == (429, "budget_exceeded")


async def test_key_spend_is_recorded_with_the_key(litellm: LiteLLM) -> None:
    """The request events carry the key's hash, the spend log's key_hash column
    (migration 0020) holds it, and LiteLLM's per-key views fill in."""
    made = await litellm.post("/key/generate", {"team_id": "search"})
    raw = await litellm.chat(key=made["key"])
    await litellm.settled()
    [row] = await litellm.get("/spend/logs", api_key=made["token_id"])
    assert row["request_id"] == raw.headers["x-ledger-request-id"]
    assert row["team_id"] == "search"
    info = await litellm.get("/key/info", key=made["token_id"])
    assert info["info"]["spend"] > 0


async def test_end_user_budget(litellm: LiteLLM) -> None:
    await litellm.post(
        "/customer/new", {"user_id": "capped", "max_budget": 0.0000001, "budget_duration": "1d"}
    )
    status, error = await _status(litellm, user="capped")
    assert (status, error.get("type")) == (429, "budget_exceeded")


async def test_blocked_end_user(litellm: LiteLLM) -> None:
    await litellm.post("/customer/block", {"user_ids": ["troll"]})
    status, _ = await _status(litellm, user="troll")
    assert status == 403


async def test_tag_spend_reset_restarts_the_window(litellm: LiteLLM) -> None:
    await litellm.post("/tag/new", {"name": "reset-me", "max_budget": 1, "budget_duration": "1d"})
    await litellm.chat(extra_body={"metadata": {"tags": ["reset-me"]}})
    await litellm.settled()
    await litellm.post("/tag/update", {"name": "reset-me", "spend": 0})
    info = (await litellm.post("/tag/info", {"names": ["reset-me"]}))["reset-me"]
    assert info["spend"] == 0
