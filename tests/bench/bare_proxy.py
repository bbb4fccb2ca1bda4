"""The baseline: a bare aiohttp pass-through proxy (no auth, no ledger)."""

from __future__ import annotations

import argparse

import aiohttp
from aiohttp import web


def make_app(upstream: str) -> web.Application:
    session: dict[str, aiohttp.ClientSession] = {}

    async def start(app: web.Application) -> None:
        session["s"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))

    async def stop(app: web.Application) -> None:
        await session["s"].close()

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with session["s"].post(
            upstream + request.path, data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            data = await resp.read()
            return web.Response(status=resp.status, body=data, content_type="application/json")

    app = web.Application()
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_post("/{tail:.*}", forward)
    return app


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host="127.0.0.1", port=args.port, print=None, access_log=None)
