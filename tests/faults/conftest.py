"""Fault-test fixtures and the summary table `make test-faults` prints."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.faults.facts import Facts
from tests.faults.harness import Cluster


@dataclass
class Row:
    scenario: str
    requests: int
    admitted: int
    spend_vs_budget: str
    lost: int
    duplicates: int
    errors_5xx: int

    @classmethod
    def measured(
        cls, scenario: str, requests: int, facts: Facts, spend_vs_budget: str, errors_5xx: int
    ) -> Row:
        """A row whose admitted, lost and dups figures are what the log says
        (tests/faults/facts.py), never a number the scenario wrote itself."""
        return cls(
            scenario, requests, facts.admitted, spend_vs_budget, len(facts.lost), len(facts.dups), errors_5xx
        )


REPORT: list[Row] = []


@pytest.fixture
def report() -> list[Row]:
    return REPORT


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    c = Cluster(tmp_path).start(
        reservation_ttl_s="4", sweep_interval_s="0.5", upstream_total_timeout_s="2", append_timeout_s="1"
    )
    try:
        yield c
    finally:
        c.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    tr = terminalreporter
    tr.section("fault scenarios")
    header = (
        f"{'scenario':60} {'requests':>8} {'admitted':>8} {'spend vs budget':>24} "
        f"{'lost':>5} {'dups':>5} {'5xx':>5}"
    )
    tr.write_line(header)
    for r in REPORT:
        tr.write_line(
            f"{r.scenario:60} {r.requests:>8} {r.admitted:>8} {r.spend_vs_budget:>24} "
            f"{r.lost:>5} {r.duplicates:>5} {r.errors_5xx:>5}"
        )
