"""LiteLLM's end-user ("customer") API and its /end_user/ aliases, with
LiteLLM's documented bodies and response shapes. Raw ids travel in requests and
answers but are stored nowhere."""

from __future__ import annotations

from gateway.appkeys import STORE
from tests.compat.conftest import LiteLLM, assert_daily_activity

# LiteLLM_EndUserTable (litellm/proxy/_types.py)
END_USER = {"user_id", "blocked", "alias", "spend", "allowed_model_region", "default_model", "budget_id"}


async def test_customer_lifecycle(litellm: LiteLLM) -> None:
    made = await litellm.post(
        "/customer/new",
        {"user_id": "ishaan-jaff-3", "alias": "Ishaan", "max_budget": 1, "budget_duration": "1d"},
    )
    assert set(made) >= END_USER | {"litellm_budget_table"}
    assert (made["user_id"], made["alias"], made["blocked"], made["spend"]) == (
        "ishaan-jaff-3",
        "Ishaan",
        False,
        0,
    )
    assert (made["allowed_model_region"], made["default_model"]) == (None, None)
    table = made["litellm_budget_table"]
    assert (table["max_budget"], table["budget_duration"]) == (1, "1d")
    assert table["budget_reset_at"].endswith("T00:00:00Z")

    # the end user's traffic (the request's `user`) counts as its spend
    for _ in range(2):
        await litellm.chat(user="ishaan-jaff-3")
    await litellm.chat(user="someone-else")
    await litellm.settled()
    info = await litellm.get("/customer/info", end_user_id="ishaan-jaff-3")
    assert set(info) >= END_USER
    assert info["user_id"] == "ishaan-jaff-3"
    assert info["spend"] > 0
    assert (info["request_count"], info["total_spend"]) == (2, info["spend"])
    assert info == await litellm.get("/end_user/info", end_user_id="ishaan-jaff-3")

    updated = await litellm.post("/customer/update", {"user_id": "ishaan-jaff-3", "max_budget": 5})
    assert updated["litellm_budget_table"]["max_budget"] == 5
    assert (updated["alias"], updated["budget_duration"]) == ("Ishaan", "1d")

    # LiteLLM's block creates an end user it does not know yet
    blocked = await litellm.post("/customer/block", {"user_ids": ["ishaan-jaff-3", "new-user"]})
    assert [(u["user_id"], u["blocked"]) for u in blocked["blocked_users"]] == [
        ("ishaan-jaff-3", True),
        ("new-user", True),
    ]
    listed = await litellm.get("/customer/list")
    assert len(listed) == 2
    assert {u["user_id"] for u in listed} == {u["user_hash"] for u in listed}  # no raw id is kept to show
    assert all(set(u) >= END_USER for u in listed)

    unblocked = await litellm.post("/end_user/unblock", {"user_ids": ["ishaan-jaff-3"]})
    assert [(u["user_id"], u["blocked"]) for u in unblocked["unblocked_users"]] == [("ishaan-jaff-3", False)]
    assert len(unblocked["blocked_users"]) == 1  # new-user, still blocked

    deleted = await litellm.post("/customer/delete", {"user_ids": ["ishaan-jaff-3", "new-user"]})
    assert deleted["deleted_customers"] == 2
    assert "message" in deleted
    status, body = await litellm.call("GET", "/customer/info", end_user_id="ishaan-jaff-3")
    assert (status, body["error"]["type"]) == (404, "not_found_error")
    assert await litellm.get("/customer/list") == []

    # the raw ids reached no event (they are hashed on arrival, like the gateway's `user`)
    pool = litellm.gw.app[STORE].pool
    for raw in ("ishaan-jaff-3", "new-user", "someone-else"):
        assert await pool.fetchval("select count(*) from events where data::text like $1", f"%{raw}%") == 0


async def test_customer_errors_are_clear(litellm: LiteLLM) -> None:
    await litellm.post("/customer/new", {"user_id": "u1"})
    status, body = await litellm.call("POST", "/customer/new", {"user_id": "u1"})
    assert (status, body["error"]["param"]) == (409, "user_id")  # LiteLLM: 400
    status, body = await litellm.call("POST", "/customer/update", {"user_id": "ghost", "max_budget": 1})
    assert status == 404
    status, body = await litellm.call("POST", "/customer/delete", {"user_ids": ["u1", "ghost"]})
    assert (status, body["error"]["param"]) == (404, "user_ids")
    assert "user_ids[1]" in body["error"]["message"]
    assert (await litellm.get("/customer/info", end_user_id="u1"))["user_id"] == "u1"  # nothing deleted
    for bad, param in (
        ({"user_id": "u2", "allowed_model_region": "eu"}, "allowed_model_region"),
        ({"user_id": "u2", "default_model": "gpt-4o"}, "default_model"),
        ({"user_id": "u2", "budget_duration": "1d"}, "budget_duration"),
        ({"user_id": "u2", "max_budget": -1}, "max_budget"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u2", "rpm_limit": 0}, "rpm_limit"),
    ):
        status, body = await litellm.call("POST", "/customer/new", bad)
        assert (status, body["error"]["param"]) == (422, param), (bad, body)
    status, body = await litellm.call("GET", "/customer/info")
    assert (status, body["error"]["param"]) == (400, "end_user_id")
    status, body = await litellm.call("GET", "/customer/info", user_hash="\x00not-a-hash")
    assert (status, body["error"]["param"]) == (400, "user_hash")  # found by schemathesis: was a 500


async def test_customer_daily_activity(litellm: LiteLLM) -> None:
    await litellm.chat(user="acme-user-1")
    await litellm.chat(user="acme-user-2")
    await litellm.settled()
    body = await litellm.get("/customer/daily/activity", end_user_ids="acme-user-1")
    assert_daily_activity(body)
    [today] = body["results"]
    assert today["metrics"]["api_requests"] == 1
    [who] = today["breakdown"]["entities"]  # the end user's hash, never the raw id
    assert len(who) == 64
    both = await litellm.get("/end_user/daily/activity")
    assert both["metadata"]["total_api_requests"] == 2
    mine = await litellm.get("/user/daily/activity", user_id="acme-user-2")
    assert_daily_activity(mine)
    assert mine["metadata"]["total_api_requests"] == 1
