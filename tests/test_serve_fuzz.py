"""Fuzzing `monotile serve` from its own /openapi.json: schemathesis generates valid and invalid
requests for every route (each with the API key), and none may get a 5xx or take the server down.
"""

from __future__ import annotations

import collections

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

from test_serve import start_server, stop

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

KEY = "sk-fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
EXAMPLES = 25  # per route and mode (valid, invalid): about a minute on 2 cores
EXCLUDED = [
    # the schema cannot say what else a valid request needs: a served model of the route's
    # kind, a prompt in the model's vocabulary and within its context, a readable upload
    schemathesis.checks.positive_data_acceptance,
    # /openapi.json documents 422 for a bad request, the server answers 400 (OpenAI's
    # status): test_openapi_documents_the_statuses_the_server_answers below
    schemathesis.checks.status_code_conformance,
]


@pytest.fixture(scope="module")
def server(tiny_run):
    proc, url = start_server(str(tiny_run.dir), "--api-key", KEY)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", headers=AUTH)
    schema.config.update(base_url=server, headers=AUTH, request_timeout=60)
    return schema


def fuzz(operation, mode: GenerationMode, seen: collections.Counter) -> None:
    """EXAMPLES requests of `mode` to `operation`; raises at the first one that fails a check."""

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    def one(case):
        # a JSON body's `model` names the served run: the schema cannot say which names are
        # served, and a made-up one is a 400 before any generation code runs
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = "tiny"
        response = case.call(headers=AUTH, timeout=60)
        seen[response.status_code] += 1
        assert response.status_code < 500, f"{response.status_code}: {response.text[:500]}"
        case.validate_response(response, headers=AUTH, excluded_checks=EXCLUDED)

    one()


def test_no_generated_request_gets_a_server_error(server, api_schema):
    failures, seen = {}, {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            name = f"{operation.label} ({mode.value})"
            seen[name] = collections.Counter()
            try:
                fuzz(operation, mode, seen[name])
            except Exception as e:  # every route's first failure, not only the first route's
                failures[name] = f"{type(e).__name__}: {e}"
    print("\n".join(f"{name}: {dict(statuses)}" for name, statuses in seen.items()))
    assert not failures, "\n\n".join(f"{name}\n{text}" for name, text in failures.items())
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
