"""A script as a LiteLLM proxy user writes it: stdlib HTTP for the admin API,
the openai SDK for traffic, nothing from budget-ledger. tests/compat/test_script.py
runs it unchanged against the gateway.

usage: python litellm_script.py <base url> <master key>
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from typing import Any

import openai

BASE, MASTER_KEY = sys.argv[1].rstrip("/"), sys.argv[2]


def call(method: str, path: str, body: Any = None, **params: str) -> Any:
    url = BASE + path + ("?" + urllib.parse.urlencode(params) if params else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310 - http(s) from argv
    request.add_header("Authorization", f"Bearer {MASTER_KEY}")
    request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310 - the test's own server
        return json.loads(response.read())


def main() -> None:
    today = datetime.now(UTC).date().isoformat()
    call(
        "POST",
        "/tag/new",
        {"name": "engineering", "description": "Engineering", "max_budget": 500, "budget_duration": "30d"},
    )
    key = call(
        "POST",
        "/key/generate",
        {
            "key_alias": "eng-bot",
            "models": ["gpt-4o-mini"],
            "max_budget": 50,
            "tags": ["engineering"],
            "metadata": {"team": "eng"},
        },
    )
    call("POST", "/customer/new", {"user_id": "customer-42", "max_budget": 10, "budget_duration": "30d"})

    client = openai.OpenAI(base_url=BASE + "/v1", api_key=key["key"], max_retries=0)
    response = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=20,
        user="customer-42",
        extra_body={"metadata": {"tags": ["feature-chat"]}},
    )
    request_id = response.headers["x-ledger-request-id"]
    client.close()

    budget = call("POST", "/tag/info", {"names": ["engineering"]})["engineering"]["litellm_budget_table"]
    assert budget["max_budget"] == 500, budget

    # spend is written a moment after the response: wait for it, as against LiteLLM
    spend: dict[str, Any] = {}
    logs: list[Any] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        spend = {row["individual_request_tag"]: row for row in call("GET", "/spend/tags")}
        logs = call("GET", "/spend/logs", request_id=request_id)
        if "engineering" in spend and logs:
            break
        time.sleep(0.2)
    assert spend["engineering"]["log_count"] == 1, spend
    assert spend["feature-chat"]["total_spend"] > 0, spend
    [log] = logs
    assert set(log["request_tags"]) == {"engineering", "feature-chat"}, log

    info = call("GET", "/key/info", key=key["token_id"])["info"]
    assert (info["key_alias"], info["models"], info["max_budget"]) == ("eng-bot", ["gpt-4o-mini"], 50), info

    customer = call("GET", "/customer/info", end_user_id="customer-42")
    assert customer["spend"] > 0, customer
    assert customer["litellm_budget_table"]["max_budget"] == 10, customer

    activity = call("GET", "/tag/daily/activity", tags="engineering", start_date=today, end_date=today)
    assert activity["results"][0]["metrics"]["api_requests"] == 1, activity

    report = call("GET", "/global/spend/report", start_date=today, end_date=today, group_by="customer")
    assert report[0]["customers"][0]["total_spend"] > 0, report

    call("POST", "/key/update", {"key": key["key"], "max_budget": 75})
    assert call("GET", "/key/info", key=key["token_id"])["info"]["max_budget"] == 75

    call("POST", "/customer/block", {"user_ids": ["customer-42"]})
    assert call("GET", "/customer/info", end_user_id="customer-42")["blocked"] is True
    call("POST", "/customer/unblock", {"user_ids": ["customer-42"]})

    assert call("POST", "/key/delete", {"keys": [key["key"]]})["deleted_keys"] == [key["key"]]
    assert call("POST", "/customer/delete", {"user_ids": ["customer-42"]})["deleted_customers"] == 1
    call("POST", "/tag/delete", {"name": "engineering"})
    print(json.dumps({"ok": True, "request_id": request_id}))


if __name__ == "__main__":
    main()
