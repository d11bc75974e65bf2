"""Fuzzing `monotile serve` from its own /openapi.json: schemathesis generates valid and invalid
requests for every route (each with the API key), and none may get a 5xx or take the server down.
The server bugs the fuzzing found are kept below as regression tests."""

from __future__ import annotations

import collections
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable

import monotile
import test_serve
from monotile.serve.process import start_server, stop

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.generation import GenerationMode  # noqa: E402

KEY = "sk-fuzz-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
# requests per route and mode (valid, invalid); 25: about 30 s on 2 cores
EXAMPLES = int(os.environ.get("MONOTILE_FUZZ_EXAMPLES", "25"))
EXCLUDED = [
    # the schema cannot say what else a valid request needs: a served model of the route's
    # kind, a prompt in the model's vocabulary and within its context, a readable upload
    schemathesis.checks.positive_data_acceptance,
]
HUGE = 1e18  # the range drawn series values come from
runs = test_serve.runs  # the fixture: one run of each kind, trained in seconds
# the served run each route is fuzzed with
MODEL_OF = {"/v1/completions": "text", "/v1/chat/completions": "text", "/v1/embeddings": "mini",
            "/v1/audio/transcriptions": "speech", "/v1/images/classifications": "vision",
            "/v1/forecasts": "series", "/v1/predictions": "series"}


@pytest.fixture(scope="module")
def server(runs):
    served = sorted(set(MODEL_OF.values()))
    proc, url = start_server(*(f"{name}={runs[name]}" for name in served), "--api-key", KEY)
    yield url
    stop(proc)


@pytest.fixture(scope="module")
def api_schema(server):
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", headers=AUTH)
    schema.config.update(base_url=server, headers=AUTH, request_timeout=60)
    return schema


def steerer(runs):
    """steer(body, path, mode, data): a generated body made to reach the models, where the schema
    cannot say what they need (else a 400 before any model runs): `model` names a served run of
    the route's kind; valid text keeps to the model's characters; a valid series is as long as
    the model looks back (drawn when the generated body has none: most have none), and asks
    for the model's quantiles."""
    tokenizer = monotile.load(runs["text"]).task.tokenizer
    series_config = monotile.load(runs["series"]).configs["series"]
    lookback, quantiles = series_config.lookback, series_config.quantiles

    def known(text: str) -> str:
        return tokenizer.keep_known(text)[0]

    def steer(body, path: str, mode: GenerationMode, data):
        if not isinstance(body, dict):
            return body
        if isinstance(body.get("model"), str):
            body["model"] = MODEL_OF[path]
        if mode == GenerationMode.POSITIVE:
            prompt = body.get("prompt")
            if isinstance(prompt, (str, list)):
                body["prompt"] = (known("ROMEO: " + prompt) if isinstance(prompt, str) else
                                  [known("ROMEO: " + p) for p in prompt])
            for message in body.get("messages") or []:
                content = message.get("content")
                if isinstance(content, str):
                    message["content"] = known(content)
                for part in content if isinstance(content, list) else []:
                    part["text"] = known(part["text"])
            series = body.get("series")
            if path == "/v1/forecasts" and body.get("csv") is None and not (
                    series and all(series.values())):
                series = {"y": data.draw(st.lists(st.floats(-HUGE, HUGE), min_size=lookback,
                                                  max_size=2 * lookback))}
            if series and all(series.values()):
                n = max(lookback, *(len(v) for v in series.values()))
                body["series"] = {k: (v * n)[:n] for k, v in series.items()}
                body["csv"] = None
                body["timestamps"] = (body["timestamps"] * n)[:n] if body.get(
                    "timestamps") else None
                body["quantiles"] = [q for q in body.get("quantiles") or []
                                     if q in quantiles] or None
        return body
    return steer


def fuzz(operation, mode: GenerationMode, steer, seen: collections.Counter) -> None:
    """EXAMPLES requests of `mode` to `operation`; raises at the first one that fails a check."""

    @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    def one(case, data):
        case.body = steer(case.body, case.path, mode, data)
        response = case.call(headers=AUTH, timeout=60)
        seen[response.status_code] += 1
        assert response.status_code < 500, \
            f"{response.status_code}: {response.text[:500]}\n{case.as_curl_command()}"
        case.validate_response(response, headers=AUTH, excluded_checks=EXCLUDED)

    one()


def test_no_generated_request_gets_a_server_error(server, api_schema, runs):
    steer = steerer(runs)
    failures, seen = {}, {}
    for result in api_schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            name = f"{operation.label} ({mode.value})"
            seen[name] = collections.Counter()
            try:
                fuzz(operation, mode, steer, seen[name])
            except Unsatisfiable:  # a GET without parameters: nothing invalid to send
                pass
            except Exception as e:  # every route's first failure, not only the first route's
                found = getattr(e, "exceptions", [e])  # an ExceptionGroup's, or e alone
                failures[name] = "\n".join(f"{type(x).__name__}: {x}" for x in found)
    print("\n".join(f"{name}: {dict(statuses)}" for name, statuses in seen.items()))
    assert not failures, "\n\n".join(f"{name}\n{text}" for name, text in failures.items())
    for path in ("/v1/completions", "/v1/chat/completions", "/v1/forecasts"):
        assert seen[f"POST {path} (positive)"][200] > 0, f"no request reached the model on {path}"
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    assert httpx.get(f"{server}/v1/models", headers=AUTH, timeout=10).status_code == 200


# ---- what the fuzzing found, kept fixed ------------------------------------------------

@pytest.mark.parametrize("extreme", [{"temperature": 1e-300}, {"repetition_penalty": 1e-300},
                                     {"top_p": 5e-324}], ids=lambda d: next(iter(d)))
def test_near_zero_sampling_values_are_not_a_server_error(server, extreme):
    r = httpx.post(f"{server}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "text", "prompt": "ROMEO:", "max_tokens": 3, **extreme})
    assert r.status_code < 500, r.text


@pytest.mark.parametrize("history", [{"series": {"a": [1.0, 1e20] * 48}},
                                     {"csv": "a\n" + "1\n" * 95 + "inf\n"}],
                         ids=["1e20", "inf"])
def test_a_huge_history_value_is_not_a_server_error(server, history):
    r = httpx.post(f"{server}/v1/forecasts", headers=AUTH, timeout=60,
                   json={"model": "series", **history})
    assert r.status_code < 500, r.text


def test_openapi_documents_the_400_the_server_answers(server):
    schema = httpx.get(f"{server}/openapi.json", headers=AUTH, timeout=10).json()
    assert httpx.post(f"{server}/v1/completions", headers=AUTH, json={},
                      timeout=10).status_code == 400
    undocumented = [path for path, item in schema["paths"].items()
                    if "post" in item and "400" not in item["post"]["responses"]]
    assert not undocumented


def test_openapi_documents_the_event_streams(server):
    schema = httpx.get(f"{server}/openapi.json", headers=AUTH, timeout=10).json()
    for path in ("/v1/completions", "/v1/chat/completions"):
        assert "text/event-stream" in schema["paths"][path]["post"]["responses"]["200"]["content"]


@pytest.mark.parametrize("wrong", [{"max_tokens": "3"}, {"max_tokens": True},
                                   {"stream": "yes"}, {"temperature": "0.5"}],
                         ids=lambda d: f"{next(iter(d))}={next(iter(d.values()))!r}")
def test_a_value_of_the_wrong_json_type_is_a_400(server, wrong):
    r = httpx.post(f"{server}/v1/completions", headers=AUTH, timeout=60,
                   json={"model": "text", "prompt": "ROMEO:", "max_tokens": 3, **wrong})
    assert r.status_code == 400, r.text


def test_a_wrong_method_is_a_405_that_says_which_are_allowed(server):
    r = httpx.request("TRACE", f"{server}/v1/models", headers=AUTH, timeout=10)
    assert r.status_code == 405
    assert r.headers.get("allow") == "GET"
