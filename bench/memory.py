"""Resident memory of a process decoding SmolLM2-135M-Instruct: monotile beside llama.cpp on
the same weights at equal bits per weight, each measured as the peak resident set size
(`/usr/bin/time -v`, "Maximum resident set size") of its own process, 128 tokens after the
same chat prompt, end tokens ignored:

    monotile    `monotile generate RUN --dtype D --max-new-tokens 128 --ignore-eos` (the
                prompt encoded in a child process before any weight is read, the tokenizer
                handed back let go: cli.common.apart, Tokenizer.let_go; each layer
                converted as it is read: infer/convert.py),
                and, for comparison, the run loaded whole, then optimize_for_inference(D),
                its tokenizer kept, as before
    llama.cpp   llama-cpp-python decoding the same prompt's ids (n_ctx 256) from the F32, F16,
                Q8_0 and Q4_0 files bench/real_models.py makes and the Q4_1 file itself;
                "alone": less the peak of
                `python -c "import llama_cpp"` (its interpreter and bindings)
    runtime     `python -c "import torch, monotile.cli"`: the Python runtime monotile runs on;
                "warm": the same, having decoded with a model of 64 features in that dtype
                (PyTorch's kernels' code paged in, its threads started: ~0.1 MB of weights),
                its prompt's rows through the ways SmolLM2's layers take the chat prompt's:
                the weight-only kernels (16 rows, fewer than any layer's gemm_rows), and also
                one GEMM of the dequantized W (600 rows) where a trunk layer's gemm_rows
                (quantize.tune_gemm_rows) is no more than the prompt's length

    budget = llama.cpp alone + runtime   (issue 21, target 6); "warm" with the warm runtime

    compiled `monotile generate ... --compile` (with --compile): the same, decoding through
                the compiled step (the compiler's own memory counted)

    each figure the median of 3 processes, after one not counted

    .venv/bin/python bench/memory.py [--tokens 128] [--json] [--compile]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from real_models import CACHE, PAIRS, QUESTION, assets  # noqa: E402

WHOLE = """
import sys, monotile, torch
run = monotile.load(sys.argv[1]).optimize_for_inference(sys.argv[2])
ids = run.task.prompt_ids(run.task.chat_prompt({question!r}))
from monotile.infer.generate import Sampling, generate_ids
for _ in generate_ids(run.model, torch.tensor([ids]), int(sys.argv[3]), Sampling(temperature=0.0)):
    pass
"""
WARM = """
import sys, torch, monotile.cli
from monotile.core.transformer import ModelConfig
from monotile.infer.convert import convert
from monotile.infer.generate import Sampling, generate_ids
from monotile.modalities.text import LanguageModel
cfg = ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=1, d_model=64, context=640,
                  norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)
model = LanguageModel(cfg)
convert(model, sys.argv[1])
for rows in map(int, sys.argv[2:]):  # a prompt's rows through the kernels, or one GEMM
    for _ in generate_ids(model, torch.randint(0, 64, (1, rows)), 8, Sampling(temperature=0.0)):
        pass
"""
LLAMA = """
import sys, json, llama_cpp
llm = llama_cpp.Llama(sys.argv[1], n_ctx=256, n_threads=2, verbose=False)
n = 0
for _ in llm.generate(json.loads(sys.argv[2]), temp=0.0, top_k=1):
    n += 1
    if n == int(sys.argv[3]):
        break
"""


REPEATS = 3  # each figure the median of this many processes: one moves by up to ~10 MiB


def peak_mib(*command: str) -> float:
    """The median peak resident set size of `command` in MiB over REPEATS runs (GNU time's
    -v report), after one run not counted (a first start measures layouts and kernels'
    row counts once per machine: bench/layouts.py)."""
    peaks = []
    for attempt in range(REPEATS + 1):
        done = subprocess.run(["/usr/bin/time", "-v", *command], capture_output=True,
                              text=True)
        if done.returncode:
            raise SystemExit(f"{' '.join(command[:3])}... failed:\n{done.stderr[-2000:]}")
        kb = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        if attempt:
            peaks.append(int(kb.group(1)) / 1024)
    return statistics.median(peaks)


def gemm_prefill(run_dir: Path, dtype: str, rows: int) -> bool:
    """Whether a prompt of `rows` tokens takes some of the run's layers in `dtype` through one
    GEMM of their dequantized W (a layer's gemm_rows, as this machine measured it)."""
    import monotile
    from monotile.infer.quantize import gemm_layers
    trunk = monotile.load(run_dir, dtype=dtype).model.trunk  # (the head gets the last row)
    return any(m.gemm_rows <= rows for m in gemm_layers(trunk))


def verdict(ours: float, budget: float) -> str:
    return f"{'met' if ours <= budget else 'not met'} ({ours / budget:.2f}x)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--json", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="also measure generate --compile (~20 s of compiling each)")
    a = p.parse_args()
    run_dir, source = CACHE / "smollm2-run", assets.require("SMOLLM2")
    if not (run_dir / "config.json").exists():
        raise SystemExit("run bench/real_models.py first: it imports SmolLM2 and makes the "
                         "llama.cpp files")
    import monotile
    task = monotile.load(run_dir).task
    ids = task.prompt_ids(task.chat_prompt(QUESTION))
    py, cli = sys.executable, str(Path(sys.executable).with_name("monotile"))
    runtime = peak_mib(py, "-c", "import torch, monotile.cli")
    has_llama = importlib.util.find_spec("llama_cpp") is not None
    bindings = peak_mib(py, "-c", "import llama_cpp") if has_llama else None
    rows = []
    for dtype, kind in PAIRS:
        prompts = ["16"] + (["600"] if gemm_prefill(run_dir, dtype, len(ids)) else [])
        row = {"monotile": dtype, "llama_cpp": kind, "runtime": runtime,
               "runtime_warm": peak_mib(py, "-c", WARM, dtype, *prompts)}
        row["streamed"] = peak_mib(cli, "generate", str(run_dir), "--prompt",
                                   QUESTION[0]["content"], "--max-new-tokens", str(a.tokens),
                                   "--ignore-eos", "--temperature", "0", "--dtype", dtype)
        row["whole"] = peak_mib(py, "-c", WHOLE.format(question=QUESTION), str(run_dir),
                                dtype, str(a.tokens))
        if a.compile:  # generate --compile: the compiler's memory, and the kernels' layouts
            row["compiled"] = peak_mib(cli, "generate", str(run_dir), "--prompt",
                                       QUESTION[0]["content"], "--max-new-tokens",
                                       str(a.tokens), "--ignore-eos", "--temperature", "0",
                                       "--dtype", dtype, "--compile")
        gguf = source if kind == "Q4_1" else CACHE / f"smollm2-{kind.lower()}.gguf"
        if has_llama and gguf.exists():
            row["llama_process"] = peak_mib(py, "-c", LLAMA, str(gguf), json.dumps(ids),
                                            str(a.tokens))
            row["llama_alone"] = row["llama_process"] - bindings
            row["budget"] = row["llama_alone"] + runtime
            row["budget_warm"] = row["llama_alone"] + row["runtime_warm"]
            row["met"] = row["streamed"] <= row["budget"]
        rows.append(row)
    if a.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"peak resident memory, MiB: SmolLM2-135M-Instruct, {len(ids)}-token chat prompt + "
          f"{a.tokens} tokens; runtime (python + torch + monotile) {runtime:.0f}"
          + (f", llama_cpp's bindings {bindings:.0f}" if has_llama else ""))
    print(f"{'monotile':9} {'streamed':>9} {'whole':>7}   {'llama.cpp':9} {'process':>8} "
          f"{'alone':>6} {'budget':>7}  {'verdict':18} {'warm':>5} {'budget':>7}  verdict")
    for r in rows:
        theirs = (f"{r['llama_cpp']:9} {r['llama_process']:8.0f} {r['llama_alone']:6.0f} "
                  f"{r['budget']:7.0f}  {verdict(r['streamed'], r['budget']):18} "
                  f"{r['runtime_warm']:5.0f} {r['budget_warm']:7.0f}  "
                  f"{verdict(r['streamed'], r['budget_warm'])}" if "budget" in r else
                  f"{r['llama_cpp']:9} (llama-cpp-python not installed)")
        print(f"{r['monotile']:9} {r['streamed']:9.0f} {r['whole']:7.0f}   {theirs}")
    if a.compile:
        print("generate --compile, peak MiB: " + ", ".join(
            f"{r['monotile']} {r['compiled']:.0f}" for r in rows))


if __name__ == "__main__":
    main()
