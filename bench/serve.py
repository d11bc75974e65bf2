"""Continuous batching on CPU: the total tokens/s `monotile serve` streams to 1 client and to 16
at once, each asking /v1/completions for ~200 tokens (temperature 0.8, its own seed), with the
time to the first token and the gap between a stream's tokens (p50, p99), and the server's
resident memory (after one completion, and its peak). The target: 16 clients' total >= 4x one
client's, as a step of 16 rows reads the weights once, like a step of 1.

    .venv/bin/python bench/serve.py [--run RUN] [--clients 16] [--requests 2] [--max-tokens 200]
                                    [--dtype float32|bfloat16|int8|int4] [--json]

Without --run it trains a 6-layer, width-384 character model (10.6M parameters, context 256)
for 10 steps (15-40 s): quality does not matter for speed, and one client's decoding step
takes ~5-10 ms on 2 cores. Tokens are counted from each stream's final usage chunk. The server
inherits the environment; where it sets neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT, `monotile
serve` sets them itself (OpenMP workers spin briefly, then sleep: monotile/cli/__init__.py).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import httpx

import monotile
from monotile.infer import INFERENCE_DTYPES
from monotile.serve.process import start_server, stop

PROMPT = "ROMEO:\nWhat light through yonder window breaks?\n"
SIZE = {"n_layer": "6", "n_head": "6", "d_model": "384", "context": "256"}
QUICK = {"max_steps": "10", "batch_size": "4", "eval_interval": "10", "log_interval": "5",
         "warmup_steps": "2", "eval_tokens": "2000", "seed": "0"}


def stream(client: httpx.Client, url: str, seed: int, max_tokens: int) -> dict:
    """One streamed completion: its tokens (from the usage chunk), the seconds to the first
    token and the gaps between the chunks that carry text."""
    body = {"model": "bench", "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.8,
            "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    times, usage, done = [], None, False
    with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            elif any(c["text"] for c in chunk["choices"]):
                times.append(time.perf_counter())
    if not (done and usage and times):
        raise RuntimeError(f"seed {seed}: the stream ended without text, usage or [DONE]")
    return {"tokens": usage["completion_tokens"], "ttft": times[0] - start,
            "gaps": [b - a for a, b in zip(times, times[1:])]}


def load(url: str, clients: int, requests: int, max_tokens: int, seed: int) -> dict:
    """`clients` threads, each streaming `requests` completions one after another."""
    results, errors = [], []

    def client_loop(i):
        with httpx.Client() as client:
            for k in range(requests):
                try:
                    results.append(stream(client, url, seed + 1000 * i + k, max_tokens))
                except Exception as e:  # noqa: BLE001 (reported below)
                    errors.append(f"{type(e).__name__}: {e}")
    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, the first: {errors[0]}")
    tokens = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "seconds": wall,
            "tokens_per_s": tokens / wall,
            "ttft_ms": {"p50": 1e3 * quantile(ttft, .5), "p99": 1e3 * quantile(ttft, .99)},
            "per_token_ms": {"p50": 1e3 * quantile(gaps, .5), "p99": 1e3 * quantile(gaps, .99)}}


def resident_mib(pid: int) -> dict:
    """The server's resident memory now and at its peak (VmRSS, VmHWM of /proc/PID/status),
    in MiB; {} where /proc is not there."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"now": int(fields["VmRSS"].split()[0]) / 1024,
            "peak": int(fields["VmHWM"].split()[0]) / 1024}


def quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values`, interpolated between the nearest two."""
    xs = sorted(values)
    at = q * (len(xs) - 1)
    lo = int(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a text run to serve (default: train one, 15-40 s)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=2, help="completions per client")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--dtype", default="float32", choices=INFERENCE_DTYPES)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.run:
        run = Path(a.run)
    else:
        out = Path(tempfile.mkdtemp(prefix="monotile-bench-")) / "serve"
        run = monotile.train("text", "shakespeare-char", out=out, quiet=True,
                             overrides={**SIZE, **QUICK}).dir
    proc, url = start_server(f"bench={run}", "--max-batch", str(max(a.clients, 1)),
                             "--dtype", a.dtype)
    load_before = os.getloadavg()[0]  # other work on the machine slows the server's threads
    try:
        load(url, 1, 1, 20, seed=0)  # warm up
        memory = {"after_one_completion": resident_mib(proc.pid)}
        one = load(url, 1, a.requests, a.max_tokens, seed=1)
        many = load(url, a.clients, a.requests, a.max_tokens, seed=2)
        memory["after_all"] = resident_mib(proc.pid)
    finally:
        stop(proc)
    ratio = many["tokens_per_s"] / one["tokens_per_s"]
    cfg = monotile.load(run).configs["model"]
    result = {"model": {"n_layer": cfg.n_layer, "d_model": cfg.d_model, "context": cfg.context},
              "dtype": a.dtype, "max_tokens": a.max_tokens, "one": one, "many": many,
              "ratio": ratio, "target_met": ratio >= 4, "cpus": os.cpu_count(),
              "resident_mib": memory,
              "load_average": [load_before, os.getloadavg()[0]]}
    if a.json:
        print(json.dumps(result))
        return
    print(f"monotile serve, {cfg.n_layer} layers x {cfg.d_model} wide (context {cfg.context}), "
          f"{a.dtype}; {a.requests} streamed completions of {a.max_tokens} tokens per client, "
          f"{os.cpu_count()} CPUs, load average {load_before:.1f} before, "
          f"{result['load_average'][1]:.1f} after")
    for r in (one, many):
        print(f"  {r['clients']:2d} client{'s' if r['clients'] > 1 else ' '}: "
              f"{r['tokens_per_s']:7.1f} tokens/s in all ({r['tokens']} tokens in "
              f"{r['seconds']:.1f} s); first token p50 {r['ttft_ms']['p50']:.0f} ms, p99 "
              f"{r['ttft_ms']['p99']:.0f} ms; between tokens p50 "
              f"{r['per_token_ms']['p50']:.1f} ms, p99 {r['per_token_ms']['p99']:.1f} ms")
    print(f"  {a.clients} clients / 1 client: {ratio:.2f}x; target >= 4x: "
          f"{'met' if ratio >= 4 else 'NOT met'}")
    first, last = memory["after_one_completion"], memory["after_all"]
    if first and last:
        print(f"  server resident memory: {first['now']:.0f} MiB after one completion, peak "
              f"{last['peak']:.0f} MiB after all (max batch {max(a.clients, 1)}; its KV cache "
              "takes memory as positions are written)")
    if max(result["load_average"]) > (os.cpu_count() or 1) - 0.5:
        print("  (other work kept the CPUs busy: the server's OpenMP workers lose their cores "
              "to it, and these figures are lower than an idle machine's)")


if __name__ == "__main__":
    main()
