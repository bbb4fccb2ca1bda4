"""A script written against LiteLLM's tag, key, customer and spend endpoints
(tests/compat/litellm_script.py) runs unchanged against budget-ledger."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from tests.test_proxy import ADMIN_KEY, Gateway

SCRIPT = Path(__file__).with_name("litellm_script.py")


async def test_litellm_script_runs_unchanged(gateway: Gateway) -> None:
    # a subprocess, so the gateway (in this event loop) keeps serving while the script runs
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(SCRIPT),
        gateway.url,
        ADMIN_KEY,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0, err.decode()[-3000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["ok"] is True
