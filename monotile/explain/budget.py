"""What a model costs: parameters, FLOPs per token and memory, per component.

FLOPs are counted from the shapes one forward pass sees (a forward hook on each layer):

    Linear:     2 * in * out per output position          (a multiply and an add per weight)
    Conv:       2 * (C_in / groups) * prod(kernel) per output value
    Attention:  4 * Tq * Tk * d per sequence               (Q K^T and A V, the causal mask ignored)

divided by the trunk's tokens. Training costs 3x the forward pass (the backward pass computes
two products per forward product: the input's gradient and the weight's). Memory for training
with AdamW, in bytes per value b (4 for fp32, 2 for bf16):

    weights b N, gradients b N, AdamW moments 2 b N
    activations kept for backward, per token:   b (6 d) per block for attention (norm input and
    output, q, k, v, the attended values), b (2 d + 2 h) for the MLP (4 h for SwiGLU), b d for
    the embedding and 2 b V for a language model's logits and their gradient.

The example batch comes from the run's task (Task.example_inputs), so every modality that says
what its model's input looks like has a budget.

tests/test_explain.py checks the FLOPs against torch.utils.flop_counter.FlopCounterMode and the
memory against what a real training step holds.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..core import attention as attention_module
from ..errors import ConfigError

COMPONENTS = ("embedding", "attention", "mlp", "norms", "head")


def component(name: str) -> str:
    """The component a parameter or layer of the model belongs to, by its name."""
    parts = name.split(".")
    if "attn" in parts:
        return "attention"
    if "mlp" in parts:
        return "mlp"
    if any(p.startswith("norm") or p == "embed_norm" for p in parts):
        return "norms"
    if parts[0] in ("head", "pooler"):
        return "head"
    return "embedding"


def sample_input(run, batch: int, context: int | None):
    """A batch the run's model takes (its task's example_inputs), with `context` tokens in its
    trunk where the task lets the length vary; returns (args, trunk tokens per sequence)."""
    cfg, task = run.configs["model"], run.task
    if context is not None and context > cfg.context:
        raise ConfigError(f"--context {context} is longer than the model's context "
                          f"{cfg.context}; give at most {cfg.context}")
    if context is not None and context <= 0:
        raise ConfigError(f"--context {context} is invalid: give a positive number of tokens")
    if batch <= 0:
        raise ConfigError(f"--batch {batch} is invalid: give a positive number of sequences")
    if context is not None and not task.variable_length:
        raise ConfigError(f"--context does not apply to {task.name} runs: the model's sequence "
                          f"is fixed by its config ({cfg.context} tokens)")
    return task.example_inputs(cfg, batch, context)


def forward_flops(model: nn.Module, args) -> tuple[dict[str, float], dict[str, float]]:
    """FLOPs of one forward pass of `model(*args)` per component, from the layers' shapes; and
    the values the layers outside the trunk read and write (what backward keeps of them)."""
    flops: dict[str, float] = defaultdict(float)
    outside: dict[str, float] = defaultdict(float)
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def linear(module, inputs, out):
        c = component(names[module])
        flops[c] += 2 * module.in_features * out.numel()
        if not names[module].startswith("trunk."):
            outside[c] += inputs[0].numel() + out.numel()

    def conv(module, inputs, out):
        c = component(names[module])
        k = module.in_channels // module.groups * torch.Size(module.kernel_size).numel()
        flops[c] += 2 * k * out.numel()
        if not names[module].startswith("trunk."):
            outside[c] += inputs[0].numel() + out.numel()

    for m in model.modules():
        if isinstance(m, nn.Linear) or type(m).__name__ == "PackedLinear":
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
            hooks.append(m.register_forward_hook(conv))

    original = attention_module.attention

    def counted(q, k, v, **kw):  # Q K^T and A V: 2 matmuls of 2 Tq Tk d FLOPs per head
        flops["attention"] += 4 * q.size(0) * q.size(1) * q.size(2) * k.size(2) * q.size(3)
        return original(q, k, v, **kw)

    attention_module.attention = counted
    try:
        with torch.no_grad():
            model(*args)
    finally:
        attention_module.attention = original
        for h in hooks:
            h.remove()
    return dict(flops), dict(outside)


def budget(run, *, batch: int | None = None, context: int | None = None) -> dict:
    """Parameters, FLOPs per token (forward and training) and training memory at fp32 and
    bf16, per component, for `run`'s model on batches of `batch` sequences (default: the run's
    batch size) of `context` tokens (default: the model's context)."""
    model = run.model
    batch = batch or run.train_config.batch_size
    args, T = sample_input(run, batch, context)
    tokens = batch * T
    flops, outside = forward_flops(model.eval(), args)
    params: dict[str, int] = defaultdict(int)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:  # a tied head counts once, with the embedding
            seen.add(id(p))
            params[component(name)] += p.numel()
    cfg = run.configs["model"]
    act = _activations_per_token(run.task, cfg, {k: v / tokens for k, v in outside.items()})
    rows = {}
    for c in COMPONENTS:
        n = params.get(c, 0)
        forward = flops.get(c, 0.0) / tokens
        rows[c] = {"parameters": n, "forward_flops": forward, "training_flops": 3 * forward,
                   **{f"{k}_{dt}": v for dt, b in (("fp32", 4), ("bf16", 2)) for k, v in (
                       ("weights", b * n), ("gradients", b * n), ("adamw", 2 * b * n),
                       ("activations", b * act.get(c, 0.0) * tokens))}}
    total = {k: sum(r[k] for r in rows.values()) for k in rows["embedding"]}
    return {"run": str(run.dir), "task": run.kind, "batch": batch, "tokens": T,
            "components": rows, "total": total}


def _activations_per_token(task, cfg, outside: dict[str, float]) -> dict[str, float]:
    """Values kept for backward per trunk token, per component: the trunk's by the module
    docstring's counts; a stem's and a head's (convolutions, patch and output projections) as
    the inputs and outputs their layers saw (`outside`, per token), unless the task knows its
    head better (a language model: the logits and their gradient)."""
    d, L = cfg.d_model, cfg.n_layer
    head = task.head_activations(cfg)
    return {"embedding": outside.get("embedding", d), "attention": 6 * d * L,
            "mlp": (2 * d + (4 if cfg.mlp == "swiglu" else 2) * cfg.hidden) * L,
            "norms": d, "head": outside.get("head", 0.0) if head is None else head}


def format_budget(b: dict) -> str:
    """The budget as a plain-text table (counts in millions, memory in MB = 10^6 bytes)."""
    kinds = ("weights", "gradients", "adamw", "activations")
    lines = [f"{b['task']} model, batches of {b['batch']} x {b['tokens']} tokens",
             f"{'':<11} {'':>10} {'MFLOP per token':>22}   memory in MB, fp32 / bf16",
             f"{'component':<11} {'params':>10} {'forward':>10} {'training':>11}   "
             + "  ".join(f"{k:>15}" for k in kinds)]
    for name, r in list(b["components"].items()) + [("total", b["total"])]:
        mem = "  ".join(f"{r[f'{k}_fp32'] / 1e6:7.2f}/{r[f'{k}_bf16'] / 1e6:7.2f}"
                        for k in kinds)
        lines.append(f"{name:<11} {r['parameters'] / 1e6:9.3f}M {r['forward_flops'] / 1e6:10.3f} "
                     f"{r['training_flops'] / 1e6:11.3f}   {mem}")
    t = b["total"]
    fp32, bf16 = (sum(t[f"{k}_{dt}"] for k in kinds) / 1e6 for dt in ("fp32", "bf16"))
    lines.append(f"a training step holds about {fp32:,.1f} MB in fp32, {bf16:,.1f} MB in bf16")
    return "\n".join(lines)
