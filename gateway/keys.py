"""Typed application keys: everything the app owns, in one place."""

from __future__ import annotations

import redis.asyncio as redis
from aiohttp import web

from ledger.settings import Settings
from ledger.store import EventStore

SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", EventStore)
REDIS = web.AppKey("redis", redis.Redis)

REQUEST_ID = web.RequestKey("request_id", str)
