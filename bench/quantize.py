"""Weight-only int8 against fp32: size, validation loss, and decoding tokens/s at batch 1.

1. A trained run (default: train the shakespeare-char preset, ~2 min): its weights' bytes, its
   validation loss in fp32 and in int8 (target: at most 1 % worse), and greedy decoding with
   the KV cache in both, alternating in one process.
2. A GPT-2-small-shaped model (124M parameters, random weights: speed does not depend on them)
   decoding at batch 1 in fp32 and int8, against the memory-bandwidth limit: the bytes of
   weights a step reads divided by a copy bandwidth measured here.

    .venv/bin/python bench/quantize.py [--run RUN] [--out DIR] [--tokens 200] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

import torch

import monotile
from monotile.core.transformer import ModelConfig, init_weights
from monotile.infer.generate import Sampling, generate_ids
from monotile.infer.quantize import quantize_int8, quantize_run, weight_bytes
from monotile.modalities.text import LanguageModel


def copy_bandwidth(n_bytes: int = 1 << 28, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (each byte read once and written once)."""
    src = torch.empty(n_bytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    best = min(_timed(lambda: dst.copy_(src)) for _ in range(repeats))
    return 2 * n_bytes / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


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
    prompt = torch.tensor([fp32.task.encode_prompt("ROMEO:")])
    speed = decode_tokens_per_s({"fp32": fp32.model, "int8": int8.model}, prompt, a.tokens)
    result["run"] = {"run": str(run_dir), "bytes_fp32": figures["bytes_before"],
                     "bytes_int8": figures["bytes_after"], "val_loss_fp32": loss32,
                     "val_loss_int8": loss8, "relative_change": (loss8 - loss32) / loss32,
                     "tokens_per_s_fp32": speed["fp32"], "tokens_per_s_int8": speed["int8"]}

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50257, n_layer=12, n_head=12, d_model=768, context=1024,
                      mlp="gelu_tanh", positions="learned", bias=True, tie_embeddings=True)
    gpt2 = LanguageModel(cfg).eval()
    init_weights(gpt2, cfg.n_layer)
    gpt2_int8 = copy.deepcopy(gpt2)
    quantize_int8(gpt2_int8)
    bandwidth = copy_bandwidth()
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    speed = decode_tokens_per_s({"fp32": gpt2, "int8": gpt2_int8}, prompt, min(a.tokens, 128),
                                rounds=2)
    # a step reads every weight once except the position table (one row); the tied
    # embedding/head matrix is read by the head
    read = {"fp32": weight_bytes(gpt2) - 4 * cfg.context * cfg.d_model,
            "int8": weight_bytes(gpt2_int8) - 4 * cfg.context * cfg.d_model}
    result["gpt2_small"] = {
        "parameters": sum(p.numel() for p in gpt2.parameters()),
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        **{f"tokens_per_s_{k}": v for k, v in speed.items()},
        **{f"bandwidth_limit_tokens_per_s_{k}": bandwidth / b for k, b in read.items()}}

    if a.json:
        print(json.dumps(result))
        return
    r = result["run"]
    print(f"{run_dir}: weights {r['bytes_fp32'] / 1e6:.2f} MB fp32 -> "
          f"{r['bytes_int8'] / 1e6:.2f} MB int8")
    print(f"  val loss fp32 {r['val_loss_fp32']:.4f}, int8 {r['val_loss_int8']:.4f} "
          f"({r['relative_change']:+.3%}; target within 1 %: "
          f"{'met' if abs(r['relative_change']) <= 0.01 else 'NOT met'})")
    print(f"  greedy decoding, batch 1: fp32 {r['tokens_per_s_fp32']:,.0f} tokens/s, int8 "
          f"{r['tokens_per_s_int8']:,.0f} ({r['tokens_per_s_int8'] / r['tokens_per_s_fp32']:.2f}x)")
    g = result["gpt2_small"]
    print(f"GPT-2-small shape ({g['parameters'] / 1e6:.0f}M parameters), batch 1, copy "
          f"bandwidth {g['copy_bandwidth_gb_s']:.1f} GB/s:")
    for k in ("fp32", "int8"):
        limit = g[f"bandwidth_limit_tokens_per_s_{k}"]
        print(f"  {k}: {g[f'tokens_per_s_{k}']:6.1f} tokens/s, bandwidth limit {limit:6.1f} "
              f"({g[f'tokens_per_s_{k}'] / limit:.0%} of it)")
    print(f"  int8 / fp32: {g['tokens_per_s_int8'] / g['tokens_per_s_fp32']:.2f}x")


if __name__ == "__main__":
    main()
