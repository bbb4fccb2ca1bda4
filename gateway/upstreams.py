"""Upstream providers: routing a model to its provider, one session per provider.

``openai/gpt-4o`` goes to the provider named ``openai`` as ``gpt-4o``; a bare
name goes to the provider that lists it, else to the default provider.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import aiohttp

from gateway.errors import ApiError
from ledger.settings import ProviderConfig, Settings


@dataclass(frozen=True, slots=True)
class Upstream:
    config: ProviderConfig
    session: aiohttp.ClientSession
    auth_header: str | None  # "Bearer <key>", read from the environment once

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def price_provider(self) -> str:
        return self.config.price_provider or self.config.name

    def url(self, path: str) -> str:
        return f"{self.config.base_url}{path}"


class Upstreams:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self.by_name: dict[str, Upstream] = {}
        self.default: Upstream | None = None

    async def open(self) -> None:
        s = self._settings
        for config in s.providers:
            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60, ttl_dns_cache=300)
            session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(
                    total=s.upstream_total_timeout_s,
                    sock_connect=s.upstream_connect_timeout_s,
                    sock_read=s.upstream_first_byte_timeout_s,
                ),
                skip_auto_headers=("User-Agent",),
            )
            key = os.environ.get(config.api_key_env) if config.api_key_env else None
            self.by_name[config.name] = Upstream(config, session, f"Bearer {key}" if key else None)
        if self.by_name:
            name = s.default_provider or s.providers[0].name
            self.default = self.by_name[name]

    async def close(self) -> None:
        for upstream in self.by_name.values():
            await upstream.session.close()

    def route(self, model: str) -> tuple[Upstream, str]:
        """(provider, the model name to send it)."""
        prefix, slash, rest = model.partition("/")
        if slash and prefix in self.by_name and rest:
            return self.by_name[prefix], rest
        for upstream in self.by_name.values():
            if model in upstream.config.models:
                return upstream, model
        if self.default is None:
            raise ApiError(
                503,
                "no upstream provider is configured",
                type="service_unavailable",
                code="no_upstream",
            )
        return self.default, model
