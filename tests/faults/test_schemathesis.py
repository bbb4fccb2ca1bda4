"""Schemathesis against the gateway's own /openapi.json: every admin route,
generated requests, no 5xx, every response as the spec says."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.faults.conftest import Row
from tests.faults.facts import ledger_facts
from tests.faults.harness import ADMIN, Cluster

pytestmark = pytest.mark.faults
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


def test_admin_api_conforms_to_its_spec(tmp_path: Path, report: list[Row]) -> None:
    cluster = Cluster(tmp_path).start()
    try:
        url = cluster.start_gateway(0)
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        statuses: list[int] = []
        operations = 0
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.path.startswith("/end_user/"):
                continue  # LiteLLM's old names for the /customer/ handlers, generated once there
            operations += 1

            @given(case=operation.as_strategy())
            @settings(max_examples=120, deadline=None, database=None, suppress_health_check=list(HealthCheck))
            def run(case: Case) -> None:
                response = case.call_and_validate(headers={"Authorization": f"Bearer {ADMIN}"}, checks=CHECKS)
                statuses.append(response.status_code)

            run()
        facts = asyncio.run(ledger_facts(cluster.pg.url))
    finally:
        cluster.stop()
    assert operations >= 30  # every admin operation in the spec, aliases aside
    assert len(statuses) >= 3000, len(statuses)
    assert max(statuses) < 500
    report.append(
        Row(
            f"schemathesis: {operations} admin operations",
            len(statuses),
            sum(1 for s in statuses if s < 300),
            "spec-conformant",
            len(facts.lost),
            len(facts.dups),
            sum(s >= 500 for s in statuses),
        )
    )
