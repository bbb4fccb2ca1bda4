"""Typed application and request keys: everything the app owns, in one place."""

from __future__ import annotations

import asyncpg
from aiohttp import web

from gateway.metrics import Metrics
from gateway.upstreams import Upstreams
from ledger.admission import Admission
from ledger.apikeys import ApiKey, KeyBook
from ledger.budgets import BudgetBook
from ledger.counters import Counters, RedisClient
from ledger.customers import CustomerBook
from ledger.domain.pricing import PriceBook
from ledger.gate import Gate
from ledger.postgres.store import EventStore
from ledger.settings import Settings
from ledger.tags import TagService

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", EventStore)
# Where spend reports and the dashboard read: the replica of
# LEDGER_DATABASE_READ_URL, else the store's own pool (the primary).
READ_POOL = web.AppKey("read_pool", asyncpg.Pool)
REDIS: web.AppKey[RedisClient] = web.AppKey("redis")
COUNTERS = web.AppKey("counters", Counters)
BUDGET_BOOK = web.AppKey("budget_book", BudgetBook)
TAGS = web.AppKey("tags", TagService)
ADMISSION = web.AppKey("admission", Admission)
GATE = web.AppKey("gate", Gate)
KEY_BOOK = web.AppKey("key_book", KeyBook)
CUSTOMER_BOOK = web.AppKey("customer_book", CustomerBook)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
PRICES = web.AppKey("prices", PriceBook)
METRICS = web.AppKey("metrics", Metrics)
USER_SECRET = web.AppKey("user_secret", bytes)
# set when requests were admitted without Redis: counters must be rebuilt from the log

REQUEST_ID = web.RequestKey("request_id", str)
API_KEY: web.RequestKey[ApiKey | None] = web.RequestKey("api_key")
