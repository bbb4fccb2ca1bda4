"""Hostile input: fuzzed attribution, a table of named attacks, and the privacy sweep."""

from __future__ import annotations

import asyncio
import base64
import hmac
import io
import json
import secrets
import subprocess
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any
from unittest import mock

import aiohttp
import msgspec
import openai
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpServer

from gateway.appkeys import BUDGET_BOOK, KEY_BOOK, SETTINGS, STORE, TAGS
from gateway.attribution import Limits, attribute
from gateway.auth import same_secret
from gateway.errors import ApiError
from gateway.mock_upstream import MockConfig, create_mock_app
from ledger import events as ev
from ledger.apikeys import KeyFields
from ledger.domain.privacy import REDACTED, secret_value
from ledger.run.embedded import EmbeddedPostgres
from ledger.settings import PriceOverride, ProviderConfig, Settings
from projections import cli_commands as commands
from tests.conftest import gateway_app, projected
from tests.faults.conftest import Row
from tests.faults.facts import caught_up, ledger_facts, verify
from tests.faults.harness import ADMIN, Cluster, http
from tests.test_privacy import SECRET_SHAPES
from tests.test_proxy import CHAT, Gateway, gateway

pytestmark = pytest.mark.faults
__all__ = ["gateway"]  # the fixture, imported for this module

SECRET_VALUES = ["sk-live-0123456789abcdef", "Bearer abc.def.ghi", "AKIAABCDEFGHIJKLMNOP", "ghp_" + "a" * 30]

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(SECRET_VALUES),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
header_text = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=300)


@settings(max_examples=600, deadline=None)
@given(
    metadata=st.one_of(
        json_values,
        st.dictionaries(
            st.one_of(st.text(max_size=20), st.sampled_from(["tags", "spend_logs_metadata", "api_key"])),
            json_values,
            max_size=4,
        ),
    ),
    tags=json_values,
    user=json_values,
    tag_header=st.one_of(st.none(), header_text),
    meta_header=st.one_of(st.none(), header_text, st.builds(json.dumps, json_values)),
)
def test_attribution_fuzz_never_crashes_nor_keeps_a_secret(
    metadata: Any, tags: Any, user: Any, tag_header: str | None, meta_header: str | None
) -> None:
    body: dict[str, Any] = {"model": "m", "metadata": metadata, "tags": tags, "user": user}
    headers = {
        k: v
        for k, v in (("x-ledger-tags", tag_header), ("x-ledger-spend-logs-metadata", meta_header))
        if v is not None
    }
    refused: ApiError | None = None
    try:
        result = attribute(body, headers, ("key-tag",), Limits(), b"k" * 32)
    except ApiError as e:
        refused = e
    if refused is not None:
        assert refused.status == 400
        assert refused.param
        return
    assert result.tags[0] == "key-tag"
    assert len(result.tags) == len(set(result.tags)) <= 64
    for key, value in result.metadata.items():
        assert not (isinstance(value, str) and secret_value(value)), (key, value)
    # judged apart from the redactor's own predicate: none of the secrets this
    # test planted survives anywhere in what is kept, however deeply nested
    kept = json.dumps(result.metadata, default=str)
    assert not [s for s in SECRET_VALUES if s in kept], kept
    assert "tags" not in body
    assert "spend_logs_metadata" not in (body.get("metadata") or {})
    if isinstance(user, str) and user:
        assert result.user_hash is not None
        assert result.user_hash != user
        if len(user) >= 8:  # (a short id like "0" can occur in any hex digest by chance)
            assert user not in result.user_hash


def test_key_comparison_is_constant_time() -> None:
    with mock.patch("gateway.auth.hmac.compare_digest", wraps=hmac.compare_digest) as spy:
        assert same_secret("a" * 20, "a" * 20)
        assert not same_secret("a", "a" * 200)  # different lengths compare digests of equal length
    assert spy.call_count == 2
    assert all(len(c.args[0]) == len(c.args[1]) == 32 for c in spy.call_args_list)


async def post(
    gw: Gateway,
    path: str,
    *,
    json_body: Any = None,
    data: bytes | None = None,
    headers: dict[str, str] | None = None,
    key: str | None = None,
) -> tuple[int, str]:
    auth = {"Authorization": f"Bearer {key or gw.key}", "Content-Type": "application/json", **(headers or {})}
    async with aiohttp.ClientSession() as s:
        payload = io.BytesIO(data) if data is not None else None
        async with s.post(f"{gw.url}{path}", json=json_body, data=payload, headers=auth) as r:
            return r.status, await r.text()


async def test_named_attacks(gateway: Gateway) -> None:
    gw = gateway
    admin = "test-admin-key-0123456789"
    results: dict[str, int] = {}
    # oversize body
    results["oversize body"], _ = await post(
        gw, "/v1/chat/completions", data=b'{"model":"m","x":"' + b"a" * (9 << 20) + b'"}'
    )
    # oversize headers: refused by the HTTP parser itself
    results["oversize header"], _ = await post(
        gw, "/v1/chat/completions", json_body=CHAT, headers={"x-ledger-tags": "a" * 20000}
    )
    # deeply nested JSON
    deep = b'{"model":"m","metadata":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    results["deeply nested JSON"], _ = await post(gw, "/v1/chat/completions", data=deep)
    # invalid UTF-8
    results["invalid UTF-8"], _ = await post(gw, "/v1/chat/completions", data=b'{"model": "\xff\xfe"}')
    # NUL bytes in tags, 10,000 tags
    results["NUL in tag"], _ = await post(gw, "/v1/chat/completions", json_body={**CHAT, "tags": ["a\x00b"]})
    results["10,000 tags"], _ = await post(
        gw, "/v1/chat/completions", json_body={**CHAT, "tags": [f"t{i}" for i in range(10_000)]}
    )
    # negative, NaN and huge budgets
    for label, value in (("negative budget", -1), ("NaN budget", "NaN"), ("huge budget", "1e30")):
        results[label], _ = await post(
            gw, "/tag/new", json_body={"name": "b", "max_budget": value}, key=admin
        )
    # path traversal in the history route
    async with aiohttp.ClientSession() as s:
        async with s.get(
            f"{gw.url}/tag/..%2F..%2Fetc%2Fpasswd/history", headers={"Authorization": f"Bearer {admin}"}
        ) as r:
            results["path traversal"] = r.status
            assert "root:" not in await r.text()
        # the admin key in a query string is refused even though it is right
        async with s.get(
            f"{gw.url}/tag/list?api_key={admin}", headers={"Authorization": f"Bearer {admin}"}
        ) as r:
            results["admin key in query string"] = r.status
    # issue 11: credentials as tags, an over-long model, out-of-range dates and cursors
    results["credential as a tag"], _ = await post(
        gw, "/v1/chat/completions", json_body={**CHAT, "tags": ["sk-proj-SECRETSECRET0123456789"]}
    )
    results["credential in x-ledger-tags"], _ = await post(
        gw, "/v1/chat/completions", json_body=CHAT, headers={"x-ledger-tags": "glpat-Ab3dEf6hIj9kLm2nOp5q"}
    )
    results["257-character model"], _ = await post(
        gw, "/v1/chat/completions", json_body={**CHAT, "model": "m" * 257}
    )
    async with aiohttp.ClientSession() as s:
        for label, query in (
            ("end_date 9999-12-31", {"end_date": "9999-12-31"}),
            ("start_date year 1 at +14:00", {"start_date": "0001-01-01T00:00:00+14:00"}),
            ("cursor past bigint", {"cursor": _BIG_CURSOR}),
        ):
            async with s.get(
                f"{gw.url}/spend/logs", params=query, headers={"Authorization": f"Bearer {admin}"}
            ) as r:
                results[label] = r.status
    assert results == {
        "credential as a tag": 400,
        "credential in x-ledger-tags": 400,
        "257-character model": 400,
        "end_date 9999-12-31": 200,
        "start_date year 1 at +14:00": 400,
        "cursor past bigint": 400,
        "oversize body": 413,
        "oversize header": 400,
        "deeply nested JSON": 400,
        "invalid UTF-8": 400,
        "NUL in tag": 400,
        "10,000 tags": 400,
        "negative budget": 422,
        "NaN budget": 422,
        "huge budget": 422,
        "path traversal": 404,
        "admin key in query string": 400,
    }


async def test_sql_injection_strings_are_stored_verbatim(gateway: Gateway) -> None:
    gw = gateway
    admin = "test-admin-key-0123456789"
    evil = "x'); drop table events; --"
    status, _ = await post(
        gw, "/tag/new", json_body={"name": evil, "max_budget": 1, "budget_duration": "1d"}, key=admin
    )
    assert status == 200
    await gw.sdk().chat.completions.create(
        **CHAT,
        extra_body={
            "tags": [evil],
            "metadata": {"spend_logs_metadata": {"note": "'; delete from events; --"}},
        },
    )
    [spend] = await gw.spends()
    assert evil in spend.tags
    assert spend.metadata == {"note": "'; delete from events; --"}
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"{gw.url}/tag/info", params={"names": evil}, headers={"Authorization": f"Bearer {admin}"}
        ) as r,
    ):
        assert r.status == 200
        assert evil in await r.json()


async def test_unicode_look_alike_tags_are_distinct(gateway: Gateway) -> None:
    gw = gateway
    latin, cyrillic = "team:search", "team:\u0455earch"  # DZE looks like s
    await gw.budget(latin, "0.0000001")
    ok = await gw.sdk().chat.completions.create(**CHAT, extra_body={"tags": [cyrillic]})
    assert ok.choices
    with pytest.raises(openai.RateLimitError):
        await gw.sdk().chat.completions.create(**CHAT, extra_body={"tags": [latin]})
    [spend] = await gw.spends()
    assert cyrillic in spend.tags
    assert latin not in spend.tags


def test_no_raw_secret_or_user_id_in_the_database_or_logs(cluster: Cluster, report: list[Row]) -> None:
    url = cluster.start_gateway(0, log_level="info")
    key = http("POST", f"{url}/key/generate", {"tags": ["privacy"]})[1]["key"]
    emails = [f"person{i}@example.com" for i in range(5)]
    secrets_sent = [
        "sk-proj-SECRETSECRET0123456789",
        "Bearer eyJhbGciOiJIUzI1NiJ9.c2VjcmV0cGF5bG9hZA.sig",
        "hunter2-password-value",
    ]
    sdk = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
    answered = []
    for i, email in enumerate(emails):
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            user=email,
            extra_body={
                "metadata": {
                    "spend_logs_metadata": {
                        "api_key": secrets_sent[0],
                        "password": secrets_sent[2],
                        "note": secrets_sent[1],
                        "n": i,
                    }
                }
            },
            extra_headers={
                "x-ledger-spend-logs-metadata": json.dumps(
                    {"Authorization": secrets_sent[1], "token": secrets_sent[0]}
                )
            },
        )
        raw.parse()
        answered.append(raw.headers["x-ledger-request-id"])
    # issue 11 item 5: the shapes detect-secrets' rules catch, in metadata (redacted)
    # and as tags (refused: never stored, never logged), and a secret-named key
    shapes = [value for _, value in SECRET_SHAPES]
    for i, shape in enumerate(shapes):
        raw = sdk.chat.completions.with_raw_response.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "hi"}],
            extra_body={
                "metadata": {"spend_logs_metadata": {f"note{i}": shape, "dbpassword": "plain-but-named"}}
            },
        )
        raw.parse()
        answered.append(raw.headers["x-ledger-request-id"])
        for where in (
            {"extra_body": {"tags": [shape]}},
            {"extra_headers": {"x-ledger-tags": shape.replace(",", ";")}},
        ):
            with pytest.raises(openai.BadRequestError):
                sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], **where
                )
    sdk.close()
    asyncio.run(caught_up(cluster.pg.url))  # views hold what they will hold
    dump = subprocess.run(
        [str(EmbeddedPostgres.bin_dir() / "pg_dump"), cluster.pg.url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    logs = cluster.log_of(0)
    assert ADMIN not in logs
    assert key not in logs
    assert key not in dump
    for needle in [*emails, *secrets_sent, "SECRETSECRET", "hunter2", *shapes, "plain-but-named"]:
        assert needle not in dump, f"{needle!r} is in the database dump"
        assert needle not in logs, f"{needle!r} is in the logs"
    assert REDACTED in dump
    assert "SpendRecorded" in dump
    facts = asyncio.run(ledger_facts(cluster.pg.url, answered))
    asyncio.run(verify(cluster, counters_at_least=0))  # no budget here: no counter to compare
    sent = len(emails) + 3 * len(shapes)  # each shape: in metadata (admitted), as two tags (refused)
    report.append(Row.measured("privacy: dump + logs grep", sent, facts, "0 raw secrets", 0))


# ------------------------------------------------------------------ issue 11 item 11: admin dates and cursors

_DATED = [
    "/spend/tags",
    "/spend/users",
    "/spend/logs",
    "/spend/report",
    "/tag/daily/activity",
    "/user/daily/activity",
    "/customer/daily/activity",
    "/end_user/daily/activity",
    "/global/spend/report",
    "/tag/list",
    "/ui/api/overview",
]
_BIG_CURSOR = base64.urlsafe_b64encode(b"2026-01-01T00:00:00+00:00|" + b"9" * 40).decode()
_HOSTILE_QUERIES: list[tuple[str, dict[str, str], str]] = [
    *[(p, {"start_date": "2026-01-01", "end_date": "9999-12-31"}, "end_date") for p in _DATED],
    *[
        (p, {"start_date": "0001-01-01T00:00:00+14:00", "end_date": "2026-01-01"}, "start_date")
        for p in _DATED
    ],
    *[(p, {"start_date": "0001-01-01", "end_date": "0001-01-01"}, "*") for p in _DATED],
    ("/ui/api/tag", {"name": "t", "start_date": "2026-01-01", "end_date": "9999-12-31"}, "end_date"),
    ("/ui/api/tag", {"name": "t", "start_date": "0001-01-01T00:00:00+14:00"}, "start_date"),
    ("/spend/logs", {"cursor": _BIG_CURSOR, "limit": "10"}, "cursor"),
    ("/spend/logs", {"cursor": base64.urlsafe_b64encode(b"0001-01-01T00:00:00+14:00|1").decode()}, "cursor"),
    ("/spend/logs", {"limit": "9" * 40}, "limit"),
    ("/tag/daily/activity", {"page": "9" * 40}, "page"),
    ("/key/list", {"page": "9" * 40}, "page"),
    ("/alerts", {"limit": "9" * 40}, "limit"),
]


@pytest.mark.parametrize(
    ("path", "query", "param"), _HOSTILE_QUERIES, ids=[f"{p}-{'&'.join(q)}" for p, q, _ in _HOSTILE_QUERIES]
)
async def test_admin_dates_and_cursors_out_of_range_are_400_or_answered(
    gateway: Gateway, path: str, query: dict[str, str], param: str
) -> None:
    """Issue 11 item 11: end_date=9999-12-31, an oversized cursor position and
    0001-01-01T00:00:00+14:00 were 500s. Every such query is either answered (an empty
    range is a fine answer) or refused with a 400 naming the parameter; never a 500."""
    admin = "test-admin-key-0123456789"
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"{gateway.url}{path}", params=query, headers={"Authorization": f"Bearer {admin}"}) as r,
    ):
        body = await r.json()
    assert r.status in (200, 400), (r.status, body)
    if r.status == 400:
        assert set(body["error"]) == {"message", "type", "param", "code"}
        assert param == "*" or body["error"]["param"] == param, body


async def test_mock_requests_needs_the_admin_key(aiohttp_server: AiohttpServer) -> None:
    """Issue 11 item 11: the dev mock's /mock/requests served raw user ids and prompts
    to anyone. It answers only to the admin key, and not at all when none is set."""
    admin = "test-admin-key-0123456789"
    body = {**CHAT, "user": "ana@example.com"}
    on = await aiohttp_server(create_mock_app(MockConfig(admin_key=admin)))
    off = await aiohttp_server(create_mock_app())
    async with aiohttp.ClientSession() as s:
        for server in (on, off):
            async with s.post(server.make_url("/v1/chat/completions"), json=body) as r:
                assert r.status == 200
        statuses = {}
        for label, server, headers in (
            ("no key", on, {}),
            ("wrong key", on, {"Authorization": "Bearer not-the-admin-key"}),
            ("admin key", on, {"Authorization": f"Bearer {admin}"}),
            ("none configured", off, {"Authorization": f"Bearer {admin}"}),
        ):
            async with s.get(server.make_url("/mock/requests"), headers=headers) as r:
                statuses[label] = r.status
                text = await r.text()
                assert ("ana@example.com" in text) == (label == "admin key"), label
    assert statuses == {"no key": 401, "wrong key": 401, "admin key": 200, "none configured": 404}


# ------------------------------------------------------------------ issue 11 items 1 and 6: no poison events

# The largest value the gateway admits for every field that reaches an event, in
# 4-byte characters where characters are allowed, so view keys get the most bytes.
WIDE = "\U0001f4b8"  # a 4-byte character (category So, admitted in tags and models)
LONGEST_MODEL = WIDE * 256
LONGEST_TAGS = [f"{i:02d}" + WIDE * 254 for i in range(62)]  # with a key's and a budget's: 64
BUDGETED_TAGS = [f"b{i}" + WIDE * 126 for i in range(2)]  # definitions are at most 128 characters
LONGEST_KEY_TAG = "k" + WIDE * 127  # a key's bound tags are at most 128 characters
# `user` has no bound of its own (only its hash is stored); half a MiB keeps the body
# the gateway forwards under aiohttp's 1 MiB warning, an error under this suite's -W error.
LONGEST_USER = "u" * (512 * 1024)


def _largest_metadata() -> dict[str, Any]:
    """As many bytes of metadata as the limit admits (16 KiB encoded), with keys of 256."""
    metadata: dict[str, Any] = {}
    for i in range(100):
        candidate = {**metadata, f"{i:03d}" + "k" * 253: "v" * 200}
        if len(json.dumps(candidate, ensure_ascii=False).encode()) > 16 * 1024 - 64:
            break
        metadata = candidate
    return metadata


async def test_the_largest_admissible_values_pass_every_projection_and_replay(
    settings: Settings, aiohttp_server: AiohttpServer
) -> None:
    """Issue 11 item 1: a 3,000-character model stopped spend_rollups for good. Every
    field at the largest size the gateway admits goes through every view, live and in
    `ledger replay`, and every view advances to the head of the log."""
    mock = await aiohttp_server(create_mock_app())
    provider = ProviderConfig("mock", str(mock.make_url("/v1")).rstrip("/"), price_provider="openai")
    price = PriceOverride(LONGEST_MODEL, Decimal(1), Decimal(2))
    app = gateway_app(msgspec.structs.replace(settings, providers=(provider,), price_overrides=(price,)))
    server = await aiohttp_server(app)
    key, _ = await app[KEY_BOOK].generate(
        key_alias="wide", tags=[LONGEST_KEY_TAG], settings=KeyFields(allowed_tags=["*"])
    )
    for tag, budget in zip(BUDGETED_TAGS, ("100", "0.0000001"), strict=True):
        await app[TAGS].create(tag, ev.TagFields(max_budget=Decimal(budget), budget_duration="1d"))
    await app[BUDGET_BOOK].refresh()
    metadata = _largest_metadata()
    body = {
        "model": LONGEST_MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "user": LONGEST_USER,
        "metadata": {"spend_logs_metadata": metadata},
    }
    headers = {"Authorization": f"Bearer {key}", "x-request-id": "r" * 128}
    statuses = []
    async with aiohttp.ClientSession() as s:
        for budgeted, request_id in zip(BUDGETED_TAGS, ("a" * 128, "d" * 128), strict=True):
            headers["x-request-id"] = request_id
            tags = [budgeted, *LONGEST_TAGS]
            async with s.post(
                server.make_url("/v1/chat/completions"),
                data=io.BytesIO(json.dumps({**body, "tags": tags}).encode()),
                headers={**headers, "Content-Type": "application/json"},
            ) as r:
                statuses.append(r.status)
    assert statuses == [200, 429]  # one charged, one refused by the tiny budget
    await projected(app)
    pool = app[STORE].pool

    async def views() -> dict[str, int]:
        return {
            "spend_logs": await pool.fetchval(
                "select count(*) from spend_logs where model = $1", LONGEST_MODEL
            ),
            "tag_daily_spend": await pool.fetchval(
                "select count(*) from tag_daily_spend where model = $1", LONGEST_MODEL
            ),
            "user_spend": await pool.fetchval("select count(*) from user_spend"),
            "budget_window_spend": await pool.fetchval(
                "select count(*) from budget_window_spend where subject like $1", "%" + BUDGETED_TAGS[0]
            ),
        }

    live = await views()
    assert live == {"spend_logs": 2, "tag_daily_spend": 64, "user_spend": 1, "budget_window_spend": 1}
    head = await pool.fetchval("select max(position) from events")
    for name in ("spend_logs", "spend_rollups", "budget_windows"):
        assert await commands.replay_command(app[SETTINGS], [name], None) == 0
    assert await views() == live
    checkpoints = dict(await pool.fetch("select name, position from projection_checkpoints"))
    assert checkpoints
    assert all(p == head for p in checkpoints.values()), (head, checkpoints)


async def test_a_projection_that_cannot_apply_an_event_says_so_loudly(
    settings: Settings, aiohttp_server: AiohttpServer, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 11 item 1: a projection that met an event it could not apply retried it every
    1.6 s forever, its checkpoint still, with nothing but log lines to show. Now
    `projections status` (exit 1), /health/ready ("degraded") and /metrics name it, and
    all three clear once the batch applies."""
    app = gateway_app(
        msgspec.structs.replace(settings, poll_interval_s=0.1, admin_key="test-admin-key-0123456789")
    )
    server = await aiohttp_server(app)
    pool = app[STORE].pool
    # What an older gateway, without the 256-character bound, could have written:
    # a model name too long for the daily rollup's primary key (random: PostgreSQL
    # would compress "mmm..." to fit).
    model = secrets.token_hex(1500)
    poison = ev.SpendRecorded(
        request_id="poison", admitted_at=datetime.now(UTC), cost=Decimal(0), tags=["t"], model=model
    )
    await pool.execute(
        "insert into events (stream, version, type, data) values ('request:poison', 1, $1, $2::jsonb)",
        "SpendRecorded",
        msgspec.json.encode(poison).decode(),
    )
    admin = {"Authorization": "Bearer test-admin-key-0123456789"}

    async def observed() -> tuple[dict[str, Any], str, int]:
        async with aiohttp.ClientSession() as s:
            async with s.get(server.make_url("/health/ready")) as r:
                ready = await r.json()
                assert r.status == 200, ready  # a stuck view does not take the gateway out
            async with s.get(server.make_url("/metrics"), headers=admin) as r:
                metrics = await r.text()
        return ready, metrics, await commands.status(app[SETTINGS])

    failing = 'ledger_projection_failing{projection="spend_rollups"} 1.0'
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        ready, metrics, exit_code = await observed()
        if failing in metrics and ready["status"] == "degraded":
            break
        assert asyncio.get_running_loop().time() < deadline, (ready, metrics[-2000:])
        await asyncio.sleep(0.2)
    assert "spend_rollups failing since" in ready["projections"]
    assert "index row" in ready["projections"]  # the database's own reason
    assert exit_code == 1
    assert "FAILING" in capsys.readouterr().out  # rich wraps the rest of the cell
    # the operator repairs the log (here: removes the event); everything clears
    async with pool.acquire() as conn:
        await conn.execute("alter table events disable trigger events_append_only")
        await conn.execute("delete from events where stream = 'request:poison'")
        await conn.execute("alter table events enable trigger events_append_only")
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        ready, metrics, exit_code = await observed()
        if ready["status"] == "ok" and failing not in metrics and exit_code == 0:
            break
        assert asyncio.get_running_loop().time() < deadline, (ready, metrics[-2000:])
        await asyncio.sleep(0.2)
    assert ready["projections"] == "ok"
    assert 'ledger_projection_failing{projection="spend_rollups"} 0.0' in metrics
