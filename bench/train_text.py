"""Training speed of the shakespeare-char preset against Hugging Face's GPT2LMHeadModel.

Both models have the same dimensions (4 layers, 4 heads, width 128, context 64, 65 characters),
see the same real batches of Tiny Shakespeare (batch 12 x 64) in the same order, and use the
same AdamW, schedule and gradient clipping. They train in alternating blocks of steps in one
process, so a noisy machine slows both alike. Printed: ms/step, tokens/s, model FLOPs
utilisation against a matmul peak measured here in the same dtype, the validation loss of each
after the same number of steps, and the ratio of tokens/s.

    .venv/bin/python bench/train_text.py [--steps 2000] [--block 50] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from monotile.core.transformer import flops_per_token
from monotile.modalities.text import TextTask
from monotile.presets import PRESETS
from monotile.run import build_configs
from monotile.train.optim import lr_at, make_optimizer


def matmul_peak(dtype=torch.float32, n=2048, repeats=10) -> float:
    """Best FLOP/s of an n x n x n matmul on this machine, the denominator of MFU."""
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best


class HFAdapter(torch.nn.Module):
    """model(idx) -> logits, so the reference runs through the same loss and evaluation."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, idx):
        return self.hf(input_ids=idx).logits


def reference_model(cfg) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context, n_embd=cfg.d_model,
        n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, attn_implementation="sdpa"))
    return HFAdapter(hf)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--block", type=int, default=50, help="steps per alternating block")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()

    preset = PRESETS["shakespeare-char"]
    configs = build_configs("text", preset)
    task, model_cfg = TextTask.prepare(configs["text"], configs["model"])
    tc = configs["train"]
    torch.manual_seed(tc.seed)
    ours = task.build_model(model_cfg)
    torch.manual_seed(tc.seed)
    ref = reference_model(model_cfg)
    contenders = {"monotile": ours, "transformers": ref}
    state = {}
    for name, model in contenders.items():
        model.train()
        state[name] = dict(
            opt=make_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, beta1=tc.beta1,
                               beta2=tc.beta2),
            batches=task.batches("train", torch.Generator().manual_seed(tc.seed), tc.batch_size),
            seconds=0.0, step=0, loss=0.0)

    def train_block(name: str, n: int) -> None:
        s, model = state[name], contenders[name]
        t = time.perf_counter()
        for _ in range(n):
            lr = lr_at(s["step"], lr=tc.lr, min_lr=tc.min_lr, warmup=tc.warmup_steps,
                       decay_steps=tc.max_steps)
            for g in s["opt"].param_groups:
                g["lr"] = lr
            x, y = next(s["batches"])
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            s["opt"].step()
            s["opt"].zero_grad(set_to_none=True)
            s["loss"] = loss.item()
            s["step"] += 1
        s["seconds"] += time.perf_counter() - t

    for name in contenders:  # warm up allocators and kernels, untimed
        train_block(name, 5)
        state[name].update(seconds=0.0, step=0)
    # restart both from the same init and data after the warm-up
    torch.manual_seed(tc.seed)
    ours.load_state_dict(task.build_model(model_cfg).state_dict())
    torch.manual_seed(tc.seed)
    ref.load_state_dict(reference_model(model_cfg).state_dict())
    for name, model in contenders.items():
        state[name]["opt"] = make_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay,
                                            beta1=tc.beta1, beta2=tc.beta2)
        state[name]["batches"] = task.batches("train", torch.Generator().manual_seed(tc.seed),
                                              tc.batch_size)

    peak = matmul_peak()
    done = 0
    while done < a.steps:
        n = min(a.block, a.steps - done)
        order = list(contenders) if (done // a.block) % 2 == 0 else list(contenders)[::-1]
        for name in order:
            train_block(name, n)
        done += n

    tokens_per_step = tc.batch_size * model_cfg.context
    fpt = flops_per_token(model_cfg)
    rows = {}
    for name, model in contenders.items():
        s = state[name]
        model.eval()
        with torch.no_grad():
            val = task.evaluate(model)["val_loss"]
        tok_s = s["step"] * tokens_per_step / s["seconds"]
        rows[name] = {"ms_per_step": 1000 * s["seconds"] / s["step"], "tokens_per_s": tok_s,
                      "mfu": fpt * tok_s / peak, "train_loss": s["loss"], "val_loss": val,
                      "steps": s["step"]}
    result = {"steps": a.steps, "batch": [tc.batch_size, model_cfg.context],
              "matmul_peak_gflops": peak / 1e9, "flops_per_token": fpt, **rows,
              "speedup_tokens_per_s": rows["monotile"]["tokens_per_s"] /
              rows["transformers"]["tokens_per_s"]}
    if a.json:
        print(json.dumps(result))
        return
    print(f"shakespeare-char, {a.steps} steps of {tc.batch_size}x{model_cfg.context} tokens; "
          f"fp32 matmul peak {peak / 1e9:.0f} GFLOP/s; {fpt / 1e6:.2f} MFLOP/token")
    print(f"{'':14}{'ms/step':>9}{'tokens/s':>10}{'MFU':>7}{'train loss':>12}{'val loss':>10}")
    for name, r in rows.items():
        print(f"{name:14}{r['ms_per_step']:9.1f}{r['tokens_per_s']:10,.0f}{r['mfu']:7.1%}"
              f"{r['train_loss']:12.4f}{r['val_loss']:10.4f}")
    print(f"monotile / transformers tokens/s: {result['speedup_tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
