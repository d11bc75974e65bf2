"""Decoding speed at batch 1 for a GPT-2-small-shaped model (124M parameters, random weights:
speed does not depend on them): transformers' generate() against monotile's KV-cache decoding
of the very same weights, in fp32 (plain nn.Linear, and packed for oneDNN as `monotile
generate` runs it), in bf16 weights (packed) and in int8 weights, with the memory-bandwidth
limit (bytes of weights read per token / the read bandwidth measured here).

    .venv/bin/python bench/decode.py [--tokens 64] [--rounds 5] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from monotile.infer.generate import Sampling, generate_ids
from monotile.infer.packed import pack_linears
from monotile.infer.quantize import quantize_int8, weight_bytes
from monotile.interop.hf import model_config, to_monotile
from monotile.modalities.text import LanguageModel



def read_bandwidth(n_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of summing a 1 GiB tensor: each byte read once from memory, as a decoding step
    reads each weight once."""
    src = torch.ones(n_bytes // 4)
    src.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        src.sum()
        best = min(best, time.perf_counter() - t)
    return n_bytes / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config()).eval()  # GPT-2 small: 12 layers, width 768, 50257
    config = json.loads(hf.config.to_json_string())
    cfg = model_config(config)
    ours = LanguageModel(cfg).eval()
    weights = to_monotile("gpt2", cfg, dict(hf.state_dict()))
    weights["head.weight"] = weights["tok_emb.weight"]
    ours.load_state_dict(weights)
    packed = copy.deepcopy(ours)
    pack_linears(packed)
    bf16 = copy.deepcopy(ours).to(torch.bfloat16)
    pack_linears(bf16)
    int8 = copy.deepcopy(ours)
    quantize_int8(int8)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    greedy = Sampling(temperature=0.0)

    def run_hf():
        with torch.no_grad():
            hf.generate(prompt, max_new_tokens=a.tokens, min_new_tokens=a.tokens,
                        do_sample=False, pad_token_id=0)

    def ours_with(model):
        return lambda: [None for _ in generate_ids(model, prompt, a.tokens, greedy)]

    contenders = {"transformers fp32": run_hf, "monotile fp32 plain": ours_with(ours),
                  "monotile fp32": ours_with(packed), "monotile bf16": ours_with(bf16),
                  "monotile int8": ours_with(int8)}
    for fn in contenders.values():  # warm up
        fn()
    best = {name: 0.0 for name in contenders}
    for _ in range(a.rounds):
        for name, fn in contenders.items():
            t = time.perf_counter()
            fn()
            best[name] = max(best[name], a.tokens / (time.perf_counter() - t))
    with torch.no_grad():
        x = torch.randint(0, cfg.vocab_size, (1, 64))
        reference = ours(x).float()
        drift = {"bf16": (bf16(x).float() - reference).abs().max().item(),
                 "int8": (int8(x).float() - reference).abs().max().item()}
        spread = reference.std().item()  # how far apart the logits are, for scale
    bandwidth = read_bandwidth()
    positions = cfg.context * cfg.d_model
    fp32_bytes = weight_bytes(ours) - 4 * positions  # a step reads one row of positions
    read = {"fp32": fp32_bytes, "bf16": fp32_bytes // 2,
            "int8": weight_bytes(int8) - 4 * positions}
    result = {"tokens": a.tokens, "bandwidth_gb_s": bandwidth / 1e9, "tokens_per_s": best,
              "bandwidth_limit": {k: bandwidth / v for k, v in read.items()},
              "max_logit_change_vs_fp32": drift, "logit_std": spread}
    if a.json:
        print(json.dumps(result))
        return
    ref = best["transformers fp32"]
    print(f"GPT-2 small shape, batch 1, {a.tokens} new tokens after 16; read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s")
    print("  (monotile fp32, bf16: linear layers packed for oneDNN, as `monotile generate` runs; "
          "fp32 plain: nn.Linear as trained)")
    for name, tok_s in best.items():
        dtype = name.split()[1]
        limit = result["bandwidth_limit"][dtype]
        print(f"  {name:19} {tok_s:6.1f} tokens/s  ({tok_s / ref:.2f}x transformers; "
              f"{tok_s / limit:.0%} of the {limit:.0f} tokens/s bandwidth limit)")
    print(f"  largest logit change against fp32: bf16 {drift['bf16']:.3f}, "
          f"int8 {drift['int8']:.3f} (the logits' standard deviation is {spread:.3f})")
    for dtype in ("fp32", "bf16"):  # like for like with transformers' fp32, and bf16 weights
        ratio = best[f"monotile {dtype}"] / ref
        print(f"  target >= 2x transformers' generate(), monotile {dtype}: {ratio:.2f}x, "
              f"{'met' if ratio >= 2 else 'NOT met'}")


if __name__ == "__main__":
    main()
