"""`monotile serve` under load: 32 clients stream completions and chats for MONOTILE_LOAD_SECONDS
(60 by default) against one text run. Every request is a 200 and every stream ends properly
(each choice's finish, the usage chunk, then [DONE]); a sample of the streams equal the same
requests not streamed; afterwards nothing is left queued or running and the server is healthy.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time

import httpx
import pytest

from monotile.serve.process import start_server, stop
from test_serve import metric, wait_drained

CLIENTS = 32
SECONDS = float(os.environ.get("MONOTILE_LOAD_SECONDS", "60"))
SAMPLE = 10  # every SAMPLE-th request of a client is also asked not streamed, and compared


@pytest.fixture(scope="module")
def server(tiny_run):
    proc, url = start_server(str(tiny_run.dir))
    yield url
    stop(proc)


def request(rng: random.Random, seed: int) -> tuple[str, dict]:
    """A route and body: a completion or a chat (the tiny run's context is 32 tokens), one or
    two choices, its own seed."""
    n = rng.choice([1, 1, 1, 2])
    if rng.random() < 0.7:
        return "/v1/completions", {"model": "tiny", "prompt": rng.choice(
            ["ROMEO:", "JULIET:", "To be", "First Citizen:\n"]), "max_tokens": rng.randint(1, 16),
            "temperature": 0.8, "seed": seed, "n": n}
    return "/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": rng.choice(["Hi", "Speak"])}],
        "max_tokens": rng.randint(1, 6), "temperature": 0.8, "seed": seed, "n": n}


def streamed(client: httpx.Client, url: str, route: str, body: dict) -> dict:
    """Stream one request and check how it ends; returns its texts by choice and its usage."""
    texts, finished, usage, events = {}, {}, None, []
    with client.stream("POST", url + route, json={**body, "stream": True,
                                                  "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200, r.read()[:300]
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events and events[-1] == "[DONE]", f"the stream did not end with [DONE]: {events[-3:]}"
    for i, raw in enumerate(events[:-1]):
        chunk = json.loads(raw)
        assert "error" not in chunk, chunk
        if not chunk["choices"]:  # the usage chunk: the last before [DONE]
            assert i == len(events) - 2, "the usage chunk is not the last one"
            usage = chunk["usage"]
            continue
        for choice in chunk["choices"]:
            k = choice["index"]
            assert k not in finished, f"choice {k} goes on after its finish"
            delta = choice.get("delta", {}).get("content") if "delta" in choice else choice["text"]
            texts[k] = texts.get(k, "") + (delta or "")
            if choice["finish_reason"]:
                finished[k] = choice["finish_reason"]
    assert usage is not None, "no usage chunk before [DONE]"
    assert sorted(finished) == list(range(body["n"])), f"choices finished: {finished}"
    assert usage["completion_tokens"] >= body["n"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    return {"texts": [texts.get(k, "") for k in range(body["n"])], "usage": usage}


def whole(client: httpx.Client, url: str, route: str, body: dict) -> list[str]:
    r = client.post(url + route, json=body)
    assert r.status_code == 200, r.text[:300]
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    return [c["message"]["content"] if "message" in c else c["text"] for c in choices]


def test_32_streaming_clients_get_every_answer_whole(server):
    deadline = time.monotonic() + SECONDS
    done, compared, errors = [0], [0], []
    lock = threading.Lock()

    def client_loop(c: int):
        rng = random.Random(c)
        with httpx.Client(timeout=120) as client:
            k = 0
            while time.monotonic() < deadline and not errors:
                route, body = request(rng, seed=1000 * c + k)
                try:
                    answer = streamed(client, server, route, body)
                    if k % SAMPLE == 0:
                        alone = whole(client, server, route, body)
                        assert answer["texts"] == alone, (route, body, answer["texts"], alone)
                        with lock:
                            compared[0] += 1
                except Exception as e:  # reported once every client has stopped
                    with lock:
                        errors.append(f"{route} {body}: {type(e).__name__}: {e}")
                with lock:
                    done[0] += 1
                k += 1
    threads = [threading.Thread(target=client_loop, args=(c,)) for c in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"{len(errors)} of {done[0]} requests failed; the first: {errors[0]}"
    assert done[0] >= CLIENTS and compared[0] >= CLIENTS
    wait_drained(server, "tiny")  # the engine frees the last rows a step after the last stream
    assert metric(server, "monotile_queue_depth", model="tiny") == 0
    assert metric(server, "monotile_running_sequences", model="tiny") == 0
    assert httpx.get(server + "/health", timeout=10).status_code == 200
    print(f"{done[0]} streams in {SECONDS:.0f} s from {CLIENTS} clients, {compared[0]} "
          "compared with the same request not streamed")
