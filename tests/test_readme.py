"""The README runs top to bottom: every ``sh`` and ``python`` block, in order, in
one shell, from a directory whose ``.data`` is a running ``ledger dev`` — what a
new user does in a second terminal after ``make run``. A block preceded by
``<!-- readme-test: skip (why) -->`` is left out (``make run`` itself)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest

from tests.test_cli import dev_env, free_port, wait_ready

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\b")


def readme_blocks(text: str) -> list[tuple[int, str, str]]:
    """(line, language, code) of each runnable block, in order."""
    blocks: list[tuple[int, str, str]] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^```(\w*)\s*$", lines[i])
        if not fence:
            i += 1
            continue
        lang, start = fence.group(1), i
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        if lang in ("sh", "python") and not SKIP.search(before):
            blocks.append((start + 1, lang, "\n".join(lines[start + 1 : end])))
        i = end + 1
    return blocks


def script_of(blocks: list[tuple[int, str, str]], port: int) -> str:
    parts = ["set -euo pipefail"]
    for line, lang, code in blocks:
        code = code.replace("127.0.0.1:4000", f"127.0.0.1:{port}")
        parts.append(f"echo '--- README.md line {line} ({lang})' >&2")
        if lang == "python":
            parts.append(f".venv/bin/python - <<'README_PY'\n{code}\nREADME_PY")
        else:
            parts.append(code)
    return "\n".join(parts) + "\n"


def test_readme_blocks_are_found() -> None:
    blocks = readme_blocks((ROOT / "README.md").read_text())
    langs = [lang for _, lang, _ in blocks]
    assert langs.count("python") >= 2
    assert langs.count("sh") >= 5
    assert not any("make run" in code for _, _, code in blocks)  # skipped: the test serves


def test_the_readme_runs_top_to_bottom_against_ledger_dev(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")
    port = free_port()
    log = (tmp_path / "dev.log").open("w")
    # what `make run` runs, in the user's working directory (data in ./.data)
    dev = subprocess.Popen(
        [str(ROOT / ".venv" / "bin" / "ledger"), "dev", "--port", str(port)],
        cwd=tmp_path,
        env=dev_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_ready(port, dev)
        script = script_of(readme_blocks((ROOT / "README.md").read_text()), port)
        env = {k: v for k, v in dev_env().items() if k not in ("U", "ADMIN")}
        run = subprocess.run(
            ["bash", "-c", script],
            cwd=tmp_path,
            env={**env, "COLUMNS": "160", "PATH": os.environ["PATH"]},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert run.returncode == 0, f"{run.stderr[-4000:]}\n{run.stdout[-4000:]}"
        out = run.stdout
        (tmp_path / "readme.out").write_text(out)
        # the budget example shows what it says it shows: admitted, then refused
        codes = next(ln for ln in out.splitlines() if re.fullmatch(r"(\d{3} )+", ln))
        assert codes.startswith("200 "), codes
        assert "429" in codes, codes
        assert '"budget_exceeded"' in out
        # the demo traffic all answered
        assert "200 answered;" in out, out[-2000:]
        # no example met an error other than the budget it demonstrates
        errors = [ln for ln in out.splitlines() if '"error"' in ln and "budget_exceeded" not in ln]
        assert errors == [], errors
        assert (tmp_path / "spend.csv").stat().st_size > 0
    finally:
        dev.send_signal(signal.SIGINT)
        try:
            dev.wait(timeout=60)
        except subprocess.TimeoutExpired:
            dev.kill()
        log.close()
