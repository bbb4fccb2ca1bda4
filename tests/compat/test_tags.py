"""LiteLLM's tag API (/tag/new, /tag/info, /tag/update, /tag/list, /tag/delete,
/tag/daily/activity) with LiteLLM's documented bodies and response shapes."""

from __future__ import annotations

from datetime import UTC, datetime

from tests.compat.conftest import LiteLLM, assert_daily_activity

# LiteLLM's TagConfig (types/tag_management.py): what /tag/new and /tag/update return as "tag"
TAG_CONFIG = {"name", "description", "models", "model_info", "created_at", "updated_at", "created_by"}
# LiteLLM's budget table (LiteLLM_BudgetTable plus budget_reset_at)
BUDGET_TABLE = {
    "budget_id",
    "max_budget",
    "soft_budget",
    "max_parallel_requests",
    "tpm_limit",
    "rpm_limit",
    "model_max_budget",
    "budget_duration",
    "budget_reset_at",
}


async def test_tag_new_info_update_delete(litellm: LiteLLM) -> None:
    # TagNewRequest, every field LiteLLM documents
    created = await litellm.post(
        "/tag/new",
        {
            "name": "engineering",
            "description": "Engineering department cost center",
            "models": ["gpt-4o-mini"],
            "max_budget": 500,
            "soft_budget": 400,
            "budget_duration": "30d",
            "tpm_limit": 10000,
            "rpm_limit": 100,
            "max_parallel_requests": 5,
            "model_max_budget": {"gpt-4o-mini": {"max_budget": 50, "budget_duration": "1d"}},
            "budget_id": "eng-budget",
        },
    )
    assert set(created) == {"message", "tag"}
    assert set(created["tag"]) >= TAG_CONFIG
    assert (created["tag"]["name"], created["tag"]["models"]) == ("engineering", ["gpt-4o-mini"])

    info = await litellm.post("/tag/info", {"names": ["engineering"]})
    assert list(info) == ["engineering"]
    tag = info["engineering"]
    assert set(tag) >= TAG_CONFIG | {"litellm_budget_table"}
    table = tag["litellm_budget_table"]
    assert set(table) >= BUDGET_TABLE
    assert (table["max_budget"], table["soft_budget"], table["budget_duration"]) == (500, 400, "30d")
    assert (table["tpm_limit"], table["rpm_limit"], table["max_parallel_requests"]) == (10000, 100, 5)
    assert table["model_max_budget"] == {"gpt-4o-mini": {"max_budget": 50, "budget_duration": "1d"}}
    assert table["budget_id"] == "eng-budget"
    # 30d is the calendar month: it resets on the 1st, at midnight UTC
    reset = datetime.fromisoformat(table["budget_reset_at"])
    now = datetime.now(UTC)
    assert (reset.day, reset.hour, reset.minute) == (1, 0, 0)
    assert 0 < (reset - now).days <= 31
    assert tag["reset_at"] == table["budget_reset_at"]  # budget-ledger's name, alongside

    # TagUpdateRequest: fields not sent keep their values
    updated = await litellm.post(
        "/tag/update", {"name": "engineering", "max_budget": 600, "tpm_limit": 20000, "models": []}
    )
    assert set(updated) == {"message", "tag"}
    table = updated["tag"]["litellm_budget_table"]
    assert (table["max_budget"], table["tpm_limit"], table["rpm_limit"]) == (600, 20000, 100)
    assert updated["tag"]["description"] == "Engineering department cost center"

    deleted = await litellm.post("/tag/delete", {"name": "engineering"})
    assert "message" in deleted
    status, body = await litellm.call("POST", "/tag/info", {"names": ["engineering"]})
    assert status == 404
    assert "engineering" in body["error"]["message"]


async def test_tag_without_budget_fields_has_no_budget_table(litellm: LiteLLM) -> None:
    """LiteLLM includes litellm_budget_table only when the tag has a budget."""
    await litellm.post("/tag/new", {"name": "free-tier", "description": "routing only", "models": ["gpt-4o"]})
    tag = (await litellm.post("/tag/info", {"names": ["free-tier"]}))["free-tier"]
    assert "litellm_budget_table" not in tag
    assert tag["models"] == ["gpt-4o"]


async def test_tag_list_has_tags_only_seen_in_traffic(litellm: LiteLLM) -> None:
    await litellm.post("/tag/new", {"name": "engineering", "max_budget": 500, "budget_duration": "30d"})
    await litellm.chat(extra_body={"metadata": {"tags": ["engineering"]}})
    await litellm.chat(extra_headers={"x-litellm-tags": "feature-chat"})
    await litellm.settled()
    listed = await litellm.get("/tag/list")
    by_name = {t["name"]: t for t in listed}
    assert {"engineering", "feature-chat"} <= set(by_name)
    for t in listed:
        assert {"name", "description", "models", "created_at", "updated_at"} <= set(t)
    seen = by_name["feature-chat"]  # LiteLLM's "dynamic" spend tag
    assert seen["models"] is None
    assert seen["description"]
    assert seen["defined"] is False
    assert seen["request_count"] == 1
    assert by_name["engineering"]["defined"] is True
    # start_date and end_date (together) keep the seen tags charged on those days
    today = datetime.now(UTC).date().isoformat()
    assert "feature-chat" in {
        t["name"] for t in await litellm.get("/tag/list", start_date=today, end_date=today)
    }
    old = await litellm.get("/tag/list", start_date="2020-01-01", end_date="2020-01-02")
    assert {t["name"] for t in old} == {"engineering"}  # defined tags are always listed
    status, body = await litellm.call("GET", "/tag/list", start_date=today)
    assert (status, body["error"]["param"]) == (400, "end_date")


async def test_tag_update_spend_is_recorded_as_a_reset(litellm: LiteLLM) -> None:
    await litellm.post("/tag/new", {"name": "marketing", "max_budget": 1, "budget_duration": "1d"})
    await litellm.chat(extra_body={"metadata": {"tags": ["marketing"]}})
    before = await litellm.post("/tag/info", {"names": ["marketing"]})
    assert before["marketing"]["spend"] + before["marketing"]["reserved"] > 0  # settled or settling
    assert before["marketing"]["spend_reset_at"] is None
    updated = await litellm.post("/tag/update", {"name": "marketing", "spend": 0})
    assert updated["tag"]["spend_reset_at"] is not None
    history = await litellm.get("/tag/marketing/history")
    assert [h["type"] for h in history] == ["TagCreated", "TagSpendReset"]
    assert history[-1]["changes"] == {"spend": {"old": None, "new": 0}}
    # spend and a change together are one append: both recorded, in order
    await litellm.post("/tag/update", {"name": "marketing", "spend": "0.25", "max_budget": 2})
    history = await litellm.get("/tag/marketing/history")
    assert [h["type"] for h in history][-2:] == ["TagUpdated", "TagSpendReset"]
    assert history[-1]["changes"]["spend"]["new"] == 0.25


async def test_tag_daily_activity_in_litellm_shape(litellm: LiteLLM) -> None:
    for tags in (["engineering"], ["engineering", "marketing"], ["marketing"]):
        await litellm.chat(extra_body={"metadata": {"tags": tags}})
    await litellm.settled()
    body = await litellm.get("/tag/daily/activity", tags="engineering,marketing")
    assert_daily_activity(body)
    [today] = body["results"]
    assert today["date"] == datetime.now(UTC).date().isoformat()
    entities = today["breakdown"]["entities"]
    assert set(entities) == {"engineering", "marketing"}
    assert entities["engineering"]["metrics"]["api_requests"] == 2
    assert entities["marketing"]["metrics"]["api_requests"] == 2
    # as in LiteLLM, a request with two tags counts under each of them
    assert today["metrics"]["api_requests"] == 4
    assert set(today["breakdown"]["models"]) == {"gpt-4o-mini"}
    assert set(today["breakdown"]["providers"]) == {"mock"}
    assert body["metadata"]["total_api_requests"] == 4
    assert (body["metadata"]["page"], body["metadata"]["total_pages"], body["metadata"]["has_more"]) == (
        1,
        1,
        False,
    )
    # LiteLLM's filters: model, page and page_size
    assert (await litellm.get("/tag/daily/activity", tags="engineering", model="gpt-4o"))["results"] == []
    later = await litellm.get("/tag/daily/activity", page=2, page_size=1)
    assert later["results"] == []
    assert later["metadata"]["page"] == 2
    status, body = await litellm.call("GET", "/tag/daily/activity", page_size=0)
    assert (status, body["error"]["param"]) == (400, "page_size")
