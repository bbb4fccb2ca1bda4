"""LiteLLM's key API (/key/generate, /key/info, /key/update, /key/list,
/key/delete) with LiteLLM's documented bodies and response shapes, and the
keys used through the openai SDK."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import openai
import pytest

from gateway.appkeys import KEY_BOOK
from tests.compat.conftest import LiteLLM

# GenerateKeyResponse (litellm/proxy/_types.py): the fields a LiteLLM script reads
GENERATED = {
    "key",
    "key_name",
    "expires",
    "token_id",
    "key_alias",
    "models",
    "max_budget",
    "budget_duration",
    "user_id",
    "team_id",
    "tags",
    "metadata",
    "tpm_limit",
    "rpm_limit",
    "max_parallel_requests",
    "soft_budget",
    "blocked",
    "litellm_budget_table",
}
# the key record /key/info answers as "info" (LiteLLM's verification token row, less the token)
KEY_INFO = {
    "key_name",
    "key_alias",
    "spend",
    "expires",
    "models",
    "aliases",
    "config",
    "user_id",
    "team_id",
    "permissions",
    "max_parallel_requests",
    "metadata",
    "blocked",
    "tpm_limit",
    "rpm_limit",
    "max_budget",
    "budget_duration",
    "budget_reset_at",
    "allowed_cache_controls",
    "model_spend",
    "model_max_budget",
    "soft_budget",
    "tags",
    "created_at",
    "updated_at",
}


async def _denied(litellm: LiteLLM, key: str, **kw: object) -> int:
    try:
        await litellm.chat(key=key, **kw)
    except openai.APIStatusError as e:
        return e.status_code
    return 200


async def test_key_lifecycle(litellm: LiteLLM) -> None:
    made = await litellm.post(
        "/key/generate",
        {
            "key_alias": "search-bot",
            "duration": "30d",
            "models": ["gpt-4o-mini"],
            "max_budget": 10,
            "soft_budget": 8,
            "budget_duration": "1mo",
            "user_id": "ana@example.com",
            "team_id": "search",
            "tags": ["team:search"],
            "metadata": {"owner": "ana"},
            "tpm_limit": 1000,
            "rpm_limit": 10,
            "max_parallel_requests": 2,
            # LiteLLM's defaults for settings budget-ledger does not have
            "aliases": {},
            "config": {},
            "permissions": {},
            "allowed_cache_controls": [],
            "send_invite_email": False,
            "key_type": "default",
        },
    )
    assert set(made) >= GENERATED
    secret, token = made["key"], made["token_id"]
    assert len(token) == 64
    assert made["key_name"] == f"{secret[:3]}...{secret[-4:]}"
    assert (made["models"], made["max_budget"], made["budget_duration"]) == (["gpt-4o-mini"], 10, "1mo")
    assert (made["user_id"], made["team_id"], made["tags"]) == ("ana@example.com", "search", ["team:search"])
    expires = datetime.fromisoformat(made["expires"])
    assert timedelta(days=29) < expires - datetime.now(UTC) <= timedelta(days=30)
    assert made["litellm_budget_table"]["max_budget"] == 10

    # the key works through the SDK, for the models it may use only
    assert await _denied(litellm, secret) == 200
    assert await _denied(litellm, secret, model="gpt-4o") == 403

    # GET /key/info?key=<the key's hash> (LiteLLM's own UI names keys by hash)
    info = await litellm.get("/key/info", key=token)
    assert set(info) == {"key", "info"}
    assert info["key"] == token
    assert set(info["info"]) >= KEY_INFO
    assert info["info"]["token"] == token
    assert (info["info"]["key_alias"], info["info"]["blocked"]) == ("search-bot", False)
    assert info["info"]["budget_reset_at"] is not None
    # the secret itself is refused in a URL (URLs end up in logs), and not echoed
    status, body = await litellm.call("GET", "/key/info", key=secret)
    assert (status, body["error"]["code"]) == (400, "credentials_in_url")
    assert secret not in body["error"]["message"]
    # ... but fine in a body
    status, posted = await litellm.call("POST", "/key/info", {"key": secret})
    assert (status, posted["info"]["token"]) == (200, token)

    # /key/update: what is sent changes, the rest stays
    updated = await litellm.post(
        "/key/update", {"key": secret, "max_budget": 20, "models": [], "metadata": {"owner": "bo"}}
    )
    assert (updated["max_budget"], updated["models"], updated["metadata"]) == (20, [], {"owner": "bo"})
    assert (updated["key_alias"], updated["team_id"], updated["tpm_limit"]) == ("search-bot", "search", 1000)
    assert await _denied(litellm, secret, model="gpt-4o") == 200  # [] is every model, as in LiteLLM

    listed = await litellm.get("/key/list")
    assert set(listed) == {"keys", "total_count", "current_page", "total_pages"}
    assert token in listed["keys"]
    assert (listed["total_count"], listed["current_page"]) == (2, 1)  # and the fixture's key
    full = await litellm.get("/key/list", return_full_object="true", team_id="search")
    assert [k["token"] for k in full["keys"]] == [token]
    assert (await litellm.get("/key/list", size=1, page=2))["total_pages"] == 2

    # blocked: refused like an unknown key
    await litellm.post("/key/update", {"key": token, "blocked": True})
    assert await _denied(litellm, secret) == 401
    await litellm.post("/key/update", {"key_alias": "search-bot", "blocked": False})
    assert await _denied(litellm, secret) == 200

    deleted = await litellm.post("/key/delete", {"keys": [secret]})
    assert deleted["deleted_keys"] == [secret]
    assert deleted["key_hashes"] == [token]
    assert await _denied(litellm, secret) == 401
    status, body = await litellm.call("GET", "/key/info", key=token)
    assert status == 404


async def test_expired_key_is_refused(litellm: LiteLLM) -> None:
    made = await litellm.post("/key/generate", {"duration": "1h"})
    assert await _denied(litellm, made["key"]) == 200
    book = litellm.gw.app[KEY_BOOK]
    book.now = lambda: datetime.now(UTC) + timedelta(hours=1, seconds=1)
    assert await _denied(litellm, made["key"]) == 401
    # a new duration on /key/update counts from now
    await litellm.post("/key/update", {"key": made["token_id"], "duration": "2h"})
    assert await _denied(litellm, made["key"]) == 200


async def test_caller_chosen_key_keeps_an_old_litellm_key_working(litellm: LiteLLM) -> None:
    old = "sk-kept-from-litellm-0123456789"
    made = await litellm.post("/key/generate", {"key": old, "key_alias": "migrated"})
    assert made["key"] == old
    assert await _denied(litellm, old) == 200
    status, body = await litellm.call("POST", "/key/generate", {"key": old})
    assert (status, body["error"]["param"]) == (409, "key")
    status, body = await litellm.call("POST", "/key/generate", {"key": "short"})
    assert (status, body["error"]["param"]) == (422, "key")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"guardrails": ["pii-mask"]}, 422, "guardrails"),
        ({"permissions": {"get_spend_routes": True}}, 422, "permissions"),
        ({"key_type": "management"}, 422, "key_type"),
        ({"spend": 5}, 422, "spend"),
        ({"duration": "30dx"}, 422, "duration"),
        ({"budget_duration": "1d"}, 422, "budget_duration"),
        ({"max_budget": 1, "soft_budget": 2}, 422, "soft_budget"),
        ({"models": ["a"], "allowed_models": ["b"]}, 422, "models"),
        ({"tpm_limit": -5}, 422, "tpm_limit"),
        ({"tags": ["customer:*"]}, 422, "tags"),  # a template name is no tag to charge
        ({"tags": ["*"]}, 422, "tags"),
        ({"what": 1}, 400, "what"),
    ],
)
async def test_key_generate_refusals_name_the_field(
    litellm: LiteLLM, body: dict[str, object], status: int, param: str
) -> None:
    got, answer = await litellm.call("POST", "/key/generate", body)
    assert (got, answer["error"]["param"]) == (status, param), answer


async def test_key_delete_by_alias_and_unknown_keys(litellm: LiteLLM) -> None:
    made = await litellm.post("/key/generate", {"key_alias": "temp"})
    status, body = await litellm.call(
        "POST", "/key/delete", {"keys": [made["token_id"], "sk-nope-nope-nope"]}
    )
    assert (status, body["error"]["param"]) == (404, "keys")
    assert "sk-nope" not in body["error"]["message"]  # a value that may be a secret is never echoed
    assert (await litellm.get("/key/info", key=made["token_id"]))["info"]["key_alias"] == "temp"  # untouched
    deleted = await litellm.post("/key/delete", {"key_aliases": ["temp"]})
    assert deleted["key_hashes"] == [made["token_id"]]
