"""Weight-only int8 against fp32 on a trained run: size, validation loss, decoding tokens/s.

A trained run (default: train the shakespeare-char preset, ~2 min): its weights' bytes, its
validation loss in fp32, in int8 (target: at most 1 % worse) and with bf16 weights (what
`monotile generate --dtype bfloat16` decodes with), and greedy decoding with the
KV cache in both, alternating in one process. Decoding a model large enough for the weights'
bytes to matter (GPT-2 small, against transformers and the bandwidth limit) is bench/decode.py.

    .venv/bin/python bench/quantize.py [--run RUN] [--out DIR] [--tokens 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import monotile
from monotile.infer.generate import Sampling, generate_ids
from monotile.adapt import quantize_run


def decode_tokens_per_s(models: dict, prompt: torch.Tensor, tokens: int, rounds: int = 3):
    """Greedy decoding of `tokens` new tokens after `prompt`, the models in turn, best round."""
    greedy = Sampling(temperature=0.0)
    best = {name: 0.0 for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            t = time.perf_counter()
            for _ in generate_ids(model, prompt, tokens, greedy, seed=0):
                pass
            best[name] = max(best[name], tokens / (time.perf_counter() - t))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", help="a trained text run (default: train shakespeare-char)")
    ap.add_argument("--out", help="where to put the runs (default: a temporary folder)")
    ap.add_argument("--tokens", type=int, default=200)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_quantize_"))
    result = {}

    run_dir = Path(a.run) if a.run else monotile.train(
        "text", "shakespeare-char", out=out / "shakespeare-char", quiet=True).dir
    fp32 = monotile.load(run_dir)
    figures = quantize_run(run_dir, out / "int8")
    int8 = monotile.load(out / "int8")
    loss32, loss8 = fp32.evaluate()["val_loss"], int8.evaluate()["val_loss"]
    loss16 = monotile.load(run_dir).optimize_for_inference("bfloat16").evaluate()["val_loss"]
    prompt = torch.tensor([fp32.task.encode_prompt("ROMEO:")])
    speed = decode_tokens_per_s({"fp32": fp32.model, "int8": int8.model}, prompt, a.tokens)
    result["run"] = {"run": str(run_dir), "bytes_fp32": figures["bytes_before"],
                     "bytes_int8": figures["bytes_after"], "val_loss_fp32": loss32,
                     "val_loss_int8": loss8, "relative_change": (loss8 - loss32) / loss32,
                     "val_loss_bf16_weights": loss16,
                     "tokens_per_s_fp32": speed["fp32"], "tokens_per_s_int8": speed["int8"]}
    if a.json:
        print(json.dumps(result))
        return
    r = result["run"]
    print(f"{run_dir}: weights {r['bytes_fp32'] / 1e6:.2f} MB fp32 -> "
          f"{r['bytes_int8'] / 1e6:.2f} MB int8")
    print(f"  val loss fp32 {r['val_loss_fp32']:.4f}, int8 {r['val_loss_int8']:.4f} "
          f"({r['relative_change']:+.3%}; target within 1 %: "
          f"{'met' if abs(r['relative_change']) <= 0.01 else 'NOT met'})")
    print(f"  val loss with bf16 weights {loss16:.4f} ({(loss16 - loss32) / loss32:+.3%})")
    print(f"  greedy decoding, batch 1: fp32 {r['tokens_per_s_fp32']:,.0f} tokens/s, int8 "
          f"{r['tokens_per_s_int8']:,.0f} ({r['tokens_per_s_int8'] / r['tokens_per_s_fp32']:.2f}x)")


if __name__ == "__main__":
    main()
