"""A prompt's prefill on SmolLM2-135M-Instruct in int8 and int4: each layer's rows through
its weight-only kernel or one GEMM (int8: x rounded to 8 bits, an integer GEMM; int4: W
dequantized to bf16) from the row count this machine measured (quantize.tune_gemm_rows, kept
in layouts.json), beside the fixed GEMM_ROWS every layer had before, every layer's rows
through its kernel, and every layer's through the GEMM. One forward pass of a prompt of each
length into the KV cache, logits of the last position only (as generate's prefill), best of
--rounds, the ways taken in turn.

    .venv/bin/python bench/gemm_rows.py [--tokens 39,64,100,200,512] [--rounds 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import CACHE  # noqa: E402

import monotile  # noqa: E402
from monotile.infer.quantize import GEMM_ROWS, gemm_layers  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default="39,64,100,200,512")
    p.add_argument("--rounds", type=int, default=4)
    a = p.parse_args()
    run_dir = CACHE / "smollm2-run"
    if not (run_dir / "config.json").exists():
        raise SystemExit("run bench/real_models.py first: it imports SmolLM2")
    print(f"SmolLM2-135M-Instruct prefill, ms (best of {a.rounds}), {torch.get_num_threads()} "
          f"threads: measured row counts against GEMM_ROWS = {GEMM_ROWS} for every layer")
    for dtype in ("int8", "int4"):
        model = monotile.load(run_dir, dtype=dtype).model
        layers = gemm_layers(model)
        measured = {id(m): m.gemm_rows for m in layers}
        counts = sorted({(type(m).__name__, m.in_features, m.out_features, m.gemm_rows)
                         for m in layers})
        print(f"{dtype}: " + ", ".join(f"{k} {i}->{o} from {r}" for k, i, o, r in counts))
        for n in map(int, a.tokens.split(",")):
            x = torch.randint(0, model.trunk.cfg.vocab_size, (1, n))
            rows = {"measured": None, "fixed": GEMM_ROWS, "kernel": n + 1, "GEMM": 0}
            best = dict.fromkeys(rows, float("inf"))
            for _ in range(a.rounds):
                for way in best:
                    for m in layers:
                        m.gemm_rows = measured[id(m)] if rows[way] is None else rows[way]
                    with torch.no_grad():
                        cache = model.trunk.make_cache(1, n + 1)
                        start = time.perf_counter()
                        model(x, cache=cache, pos=0, last=True)
                        best[way] = min(best[way], time.perf_counter() - start)
            print(f"  {n:4d} tokens: measured {best['measured'] * 1e3:6.1f}  fixed "
                  f"{best['fixed'] * 1e3:6.1f}  ({best['fixed'] / best['measured']:.2f}x)  "
                  f"all kernel {best['kernel'] * 1e3:6.1f}  all GEMM {best['GEMM'] * 1e3:6.1f}")
        for m in layers:
            m.gemm_rows = measured[id(m)]


if __name__ == "__main__":
    main()
