"""A bounded schemathesis run over the committed OpenAPI document against a live server: whatever the
request, the answer is never a 5xx, always a JSON error body when it is a 4xx, and what the spec says."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis import checks

from .server_support import RunningServer

SPEC = json.loads((Path(__file__).parents[1] / "docs" / "openapi.json").read_text())
schema = schemathesis.openapi.from_dict(SPEC)


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[tuple[RunningServer, str]]:
    server = RunningServer(tenants={"fuzz": {"rate_limit": 100000, "rate_burst": 100000, "max_sandboxes": 3}})
    yield server, server.key("fuzz")
    manager = server.server.manager
    server.stop()
    assert manager is not None and not manager.sandboxes


@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_never_fails_on_any_request(case: Any, fuzz_server: tuple[RunningServer, str]) -> None:
    server, key = fuzz_server
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    assert response.status_code < 500, (case.method, case.path, response.status_code, response.text[:500])
    if 400 <= response.status_code < 500:
        body = response.json()
        assert isinstance(body.get("code"), str) and isinstance(body.get("message"), str), body
    # What the spec promises: statuses, content types, body and header schemas. Not checked: that every
    # schema-valid body is accepted (a valid timeout can exceed the policy's max_lifetime: 400 is right),
    # and the Allow header of 405s (Starlette lists one route's methods where a path has several).
    case.validate_response(response, checks=[checks.not_a_server_error, checks.status_code_conformance,
                                             checks.content_type_conformance, checks.response_schema_conformance,
                                             checks.response_headers_conformance])
