"""LiteLLM's spend API (/spend/tags, /spend/logs, /global/spend/report) with
LiteLLM's documented parameters and response shapes, on traffic sent through
the gateway with the openai SDK."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tests.compat.conftest import LiteLLM

# LiteLLM_SpendLogs (litellm/proxy/_types.py): the fields a LiteLLM script reads
SPEND_LOG = {
    "request_id",
    "api_key",
    "model",
    "call_type",
    "spend",
    "total_tokens",
    "prompt_tokens",
    "completion_tokens",
    "startTime",
    "endTime",
    "user",
    "metadata",
    "request_tags",
    "team_id",
    "end_user",
    "status",
    "custom_llm_provider",
    "model_group",
    "api_base",
    "cache_hit",
}


async def _traffic(litellm: LiteLLM) -> list[str]:
    ids = []
    for i, tags in enumerate((["engineering"], ["engineering", "marketing"], ["marketing"])):
        raw = await litellm.chat(user=f"user-{i % 2}", extra_body={"metadata": {"tags": tags}})
        ids.append(raw.headers["x-ledger-request-id"])
    await litellm.settled()
    return ids


async def test_spend_tags(litellm: LiteLLM) -> None:
    await _traffic(litellm)
    rows = await litellm.get("/spend/tags")
    by_tag = {r["individual_request_tag"]: r for r in rows}
    assert {"engineering", "marketing"} <= set(by_tag)
    for r in rows:
        assert {"individual_request_tag", "log_count", "total_spend"} <= set(r)
    assert by_tag["engineering"]["log_count"] == 2
    assert by_tag["engineering"]["total_spend"] > 0
    # dates are honoured (LiteLLM ignores them on this path)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).date().isoformat()
    assert await litellm.get("/spend/tags", start_date=tomorrow, end_date=tomorrow) == []


async def test_spend_logs(litellm: LiteLLM) -> None:
    ids = await _traffic(litellm)
    rows = await litellm.get("/spend/logs")
    assert isinstance(rows, list)
    assert [r["request_id"] for r in rows] == ids[::-1]  # newest first
    for r in rows:
        assert set(r) >= SPEND_LOG
        assert r["status"] == "success"
        assert r["total_tokens"] == r["prompt_tokens"] + r["completion_tokens"] > 0
        assert len(r["end_user"]) == 64  # the hash of `user`, never the raw id
    [one] = await litellm.get("/spend/logs", request_id=ids[1])
    assert set(one["request_tags"]) == {"key-tag", "engineering", "marketing"}  # and the key's tag
    assert one["model"] == one["model_group"] == "gpt-4o-mini"
    assert one["custom_llm_provider"] == "mock"

    # with both dates: LiteLLM's summary per day (summarize defaults to true)
    today = datetime.now(UTC).date().isoformat()
    [day] = await litellm.get("/spend/logs", start_date=today, end_date=today)
    assert {"startTime", "spend", "users", "models"} <= set(day)
    assert day["startTime"] == today
    assert day["models"] == {"gpt-4o-mini": day["spend"]}
    assert abs(sum(r["spend"] for r in rows) - day["spend"]) < 1e-12
    # summarize=false: the rows of those days
    plain = await litellm.get("/spend/logs", start_date=today, end_date=today, summarize="false")
    assert [r["request_id"] for r in plain] == ids[::-1]


async def test_global_spend_report(litellm: LiteLLM) -> None:
    await _traffic(litellm)
    today = datetime.now(UTC).date().isoformat()
    dates = {"start_date": today, "end_date": today}  # both inclusive
    [team_day] = await litellm.get("/global/spend/report", **dates)  # group_by=team by default
    assert set(team_day) == {"group_by_day", "teams"}
    assert team_day["group_by_day"].startswith(today)
    [team] = team_day["teams"]
    assert team["team_name"] == "Unassigned Team"  # the fixture's key has no team_id
    assert {"team_name", "total_spend", "metadata"} <= set(team)
    for item in team["metadata"]:
        assert set(item) == {"model", "api_key", "spend", "total_tokens"}

    [customers_day] = await litellm.get("/global/spend/report", group_by="customer", **dates)
    assert len(customers_day["customers"]) == 2
    assert {len(c["customer"]) for c in customers_day["customers"]} == {64}  # hashed end users
    total = sum(c["total_spend"] for c in customers_day["customers"])
    assert abs(total - team["total_spend"]) < 1e-12

    [tags_day] = await litellm.get("/global/spend/report", group_by="tag", **dates)
    assert {t["tag"] for t in tags_day["tags"]} >= {"engineering", "marketing"}

    per_key = await litellm.get("/global/spend/report", group_by="api_key", **dates)
    for k in per_key:
        assert {"api_key", "total_cost", "total_input_tokens", "total_output_tokens", "model_details"} <= set(
            k
        )
        for detail in k["model_details"]:
            assert set(detail) == {"model", "total_cost", "total_input_tokens", "total_output_tokens"}
    assert abs(sum(k["total_cost"] for k in per_key) - team["total_spend"]) < 1e-12

    status, body = await litellm.call("GET", "/global/spend/report", group_by="organization")
    assert (status, body["error"]["param"]) == (400, "group_by")
