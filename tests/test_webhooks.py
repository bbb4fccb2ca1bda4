"""Issue 11 item 9: webhooks follow no redirects, and their signature carries a time
(Stripe-style), checked here by the very snippet the README gives receivers."""

from __future__ import annotations

import re
import runpy
from pathlib import Path
from typing import Any

from aiohttp import web
from pytest_aiohttp import AiohttpServer
from structlog.testing import capture_logs

from ledger import events as ev
from ledger.postgres.store import EventStore
from ledger.settings import WebhookConfig
from projections.notify import SIGNATURE_HEADER, SIGNATURE_TOLERANCE_S, Notifier
from tests.test_alerts import alert_in_log, all_events

__all__ = ["alert_in_log"]  # the fixture, imported for this module

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_verifier(tmp_path: Path) -> Any:
    """The README's receiver snippet, run as the file it names."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    [snippet] = [b for b in blocks if b.startswith("# verify_ledger_webhook.py")]
    script = tmp_path / "verify_ledger_webhook.py"
    script.write_text(snippet)
    namespace = runpy.run_path(str(script))
    assert namespace["TOLERANCE_S"] == SIGNATURE_TOLERANCE_S
    return namespace["verify"]


class Recorder:
    def __init__(self, status: int = 204, location: str | None = None) -> None:
        self.status, self.location = status, location
        self.received: list[tuple[bytes, str]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.received.append((await request.read(), request.headers.get(SIGNATURE_HEADER, "")))
        headers = {"Location": self.location} if self.location else None
        return web.Response(status=self.status, headers=headers)


async def serve(aiohttp_server: AiohttpServer, path: str, recorder: Recorder) -> str:
    app = web.Application()
    app.router.add_post(path, recorder.handle)
    server = await aiohttp_server(app)
    return str(server.make_url(path))


async def deliver(store: EventStore, webhook: WebhookConfig, secret: bytes) -> None:
    """One pass of the webhook's worker over the log, without its polling loop."""
    notifier = Notifier(store, webhook, secret, base_delay_s=0)
    relevant = [e for e in await all_events(store) if e.type in notifier.types]
    async with store.pool.acquire() as conn:
        await notifier.apply(conn, relevant, {})


async def test_a_redirect_is_a_failed_delivery_not_followed(
    store: EventStore, aiohttp_server: AiohttpServer, alert_in_log: None
) -> None:
    internal = Recorder()
    target = await serve(aiohttp_server, "/internal/admin", internal)
    bouncer = Recorder(status=307, location=f"{target}?x=1")
    url = await serve(aiohttp_server, "/hook", bouncer)
    with capture_logs() as logs:
        await deliver(store, WebhookConfig("bouncy", url, max_attempts=2), b"s" * 32)
    warned = [e for e in logs if e["event"] == "alert_delivery_failed"]
    assert len(warned) == 4
    assert all("redirect" in e["error"] for e in warned)
    assert internal.received == []  # the signed POST never reached the redirect's target
    assert len(bouncer.received) == 4  # two alerts, two attempts each
    failed = [ev.decode(r) for r in await store.read_types(["AlertDeliveryFailed", "AlertDelivered"], 0, 100)]
    assert len(failed) == 4
    assert all(isinstance(f, ev.AlertDeliveryFailed) and "307" in f.error for f in failed)
    assert all("redirect" in f.error for f in failed if isinstance(f, ev.AlertDeliveryFailed))


async def test_the_readme_snippet_verifies_deliveries_and_refuses_forgeries_and_replays(
    store: EventStore, aiohttp_server: AiohttpServer, alert_in_log: None, tmp_path: Path
) -> None:
    verify = readme_verifier(tmp_path)
    recorder = Recorder()
    secret = b"a-webhook-secret-of-32-bytes-xx!"
    await deliver(store, WebhookConfig("ops", await serve(aiohttp_server, "/hook", recorder)), secret)
    assert len(recorder.received) == 2
    for body, header in recorder.received:
        assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header), header
        at = int(header.split(",")[0][2:])
        assert verify(secret, body, header)
        assert verify(secret, body, header, now=at + SIGNATURE_TOLERANCE_S)
        assert not verify(secret, body, header, now=at + SIGNATURE_TOLERANCE_S + 1)  # a replay
        assert not verify(secret, body + b" ", header)  # a changed body
        assert not verify(b"another-secret", body, header)
        forged_time = header.replace(f"t={at}", f"t={at + 60}")
        assert not verify(secret, body, forged_time, now=at + 60)  # t is signed
        for broken in ("", "t=abc,v1=00", "v1=" + "0" * 64, "sha256=" + "0" * 64, f"t={at}"):
            assert not verify(secret, body, broken, now=at)
