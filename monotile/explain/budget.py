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
    With activation checkpointing of r = L // k blocks (ModelConfig.activation_checkpointing),
    (L - r + 1) blocks' values are held at once (the others and the one being recomputed) and
    b d per recomputed block (its input); training FLOPs gain those r blocks' forward pass,
    less a pre-norm block's MLP output projection (2 h d per token): PyTorch's recompute stops
    at the last tensor backward needs (torch.utils.checkpoint's early stop).

A plan for GPUs: the memory one GPU holds (weights, gradients and moments as
train/distributed.memory_per_process counts them for the strategy, activations as above for
its batch_size / W rows) and the time a step takes,

    time per step = tokens per step x training FLOPs per token / (W x peak FLOP/s x MFU)

with the FLOPs per token of this table (6 N + 12 L T d for a language model: PaLM, Chowdhery
et al. 2022, App. B; nanoGPT's estimate_mfu), a GPU's published dense bf16 peak and an assumed
model FLOPs utilisation (40 %: llm.c's GPT-2 124M ran at about that on 8 H100s).

The example batch comes from the run's task (Task.example_inputs), so every modality that says
what its model's input looks like has a budget; a preset's model is built on the meta device
(shapes only) from its ModelConfig, which must then name its vocabulary.

tests/test_explain.py checks the FLOPs against torch.utils.flop_counter.FlopCounterMode and the
memory against what a real training step holds.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

from ..core import attention as attention_module
from ..core.transformer import ModelConfig, recomputed_blocks, weights_left_uninitialised
from ..errors import ConfigError

COMPONENTS = ("embedding", "attention", "mlp", "norms", "head")

# dense bf16 tensor-core peaks (FLOP/s), from NVIDIA's data sheets, which quote twice these
# "with sparsity": A100 312 TFLOP/s, H100 SXM and H200 SXM 989 TFLOP/s
GPUS = {"a100": 312e12, "h100": 989e12, "h200": 989e12}
MFU = 0.40  # model FLOPs utilisation assumed when none is given


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
    batch = batch or run.train_config.batch_size
    args, T = sample_input(run, batch, context)
    cfg = run.configs["model"]
    return {"run": str(run.dir), "task": run.kind,
            **_budget(run.model, cfg, args, batch, T, run.task.head_activations(cfg))}


def preset_budget(name: str, overrides: dict | None = None, *, batch: int | None = None,
                  context: int | None = None) -> tuple[dict, nn.Module, object]:
    """The budget of preset `name` (with `overrides`, as --set gives them) before any run
    exists: its modalities.text.LanguageModel on the meta device, nothing allocated. Returns
    (the budget, the model, the preset's TrainConfig)."""
    from ..modalities.text import LanguageModel
    from ..presets import PRESETS
    from ..rundir import build_configs
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    task = PRESETS[name]["task"]
    configs = build_configs(task, PRESETS[name], overrides)
    cfg, train_cfg = configs["model"], configs["train"]
    if not cfg.vocab_size:
        raise ConfigError(f"preset {name!r} sizes its model from its data (vocab_size=0): give "
                          "--set vocab_size=N, or train a run and `monotile explain RUN "
                          "--budget`")
    batch = batch or train_cfg.batch_size
    T = context or cfg.context
    if T > cfg.context or T <= 0 or batch <= 0:
        raise ConfigError(f"--batch {batch} --context {T} is invalid: give positive numbers, "
                          f"a context of at most {cfg.context}")
    with torch.device("meta"), weights_left_uninitialised():
        model = LanguageModel(cfg)
        args = (torch.zeros(batch, T, dtype=torch.long),)
    b = {"run": None, "preset": name, "task": task,
         **_budget(model, cfg, args, batch, T, 2 * cfg.vocab_size)}
    return b, model, train_cfg


def _budget(model: nn.Module, cfg: ModelConfig, args, batch: int, T: int,
            head: float | None) -> dict:
    """budget's table for `model(*args)`, a batch of `batch` sequences of T trunk tokens;
    `head`: the values per token the head keeps for backward, if known better than measured."""
    tokens = batch * T
    flops, outside = forward_flops(model.eval(), args)
    params: dict[str, int] = defaultdict(int)
    seen = set()
    for name, p in model.named_parameters():
        if id(p) not in seen:  # a tied head counts once, with the embedding
            seen.add(id(p))
            params[component(name)] += p.numel()
    act = _activations_per_token(cfg, {k: v / tokens for k, v in outside.items()}, head)
    again = _recomputed_flops(cfg, {c: flops.get(c, 0.0) / tokens for c in COMPONENTS})
    rows = {}
    for c in COMPONENTS:
        n = params.get(c, 0)
        forward = flops.get(c, 0.0) / tokens
        rows[c] = {"parameters": n, "forward_flops": forward,
                   "training_flops": 3 * forward + again.get(c, 0.0),
                   **{f"{k}_{dt}": v for dt, b in (("fp32", 4), ("bf16", 2)) for k, v in (
                       ("weights", b * n), ("gradients", b * n), ("adamw", 2 * b * n),
                       ("activations", b * act.get(c, 0.0) * tokens))}}
    total = {k: sum(r[k] for r in rows.values()) for k in rows["embedding"]}
    return {"batch": batch, "tokens": T, "activation_checkpointing": cfg.activation_checkpointing,
            "components": rows, "total": total}


def _recomputed_flops(cfg, forward: dict[str, float]) -> dict[str, float]:
    """FLOPs per token activation checkpointing adds, per component: the recomputed blocks'
    share r / L of the trunk's forward, less each one's MLP output projection (2 h d) in a
    pre-norm block, whose output no backward needs (the recompute stops before it)."""
    r = recomputed_blocks(cfg)
    if not r:
        return {}
    skipped = 2 * cfg.hidden * cfg.d_model * r if cfg.norm_position == "pre" else 0
    return {"attention": r / cfg.n_layer * forward["attention"],
            "mlp": r / cfg.n_layer * forward["mlp"] - skipped}


def _activations_per_token(cfg, outside: dict[str, float],
                           head: float | None) -> dict[str, float]:
    """Values kept for backward per trunk token, per component: the trunk's by the module
    docstring's counts for the L blocks whose values are held at once (with activation
    checkpointing L - r + 1, and each of the r recomputed blocks' input, which its first norm
    reads, with the norms); a stem's and a head's (convolutions, patch and output
    projections) as the inputs and outputs their layers saw (`outside`, per token), unless
    `head` says better (a language model: the logits and their gradient)."""
    d, r = cfg.d_model, recomputed_blocks(cfg)
    L = cfg.n_layer - r + (1 if r else 0)
    return {"embedding": outside.get("embedding", d), "attention": 6 * d * L,
            "mlp": (2 * d + (4 if cfg.mlp == "swiglu" else 2) * cfg.hidden) * L,
            "norms": d + d * r, "head": outside.get("head", 0.0) if head is None else head}


def plan(b: dict, model: nn.Module, train_cfg, *, gpus: int = 1, strategy: str = "ddp",
         gpu: str | None = None, peak_tflops: float | None = None, mfu: float = MFU) -> dict:
    """Memory per GPU and time per step for training on `gpus` GPUs with `strategy`, from the
    budget `b` of `model` and the run's or preset's training settings (see the module
    docstring): a step is batch_size x grad_accum sequences of b["tokens"] tokens, each GPU
    computing batch_size / gpus of them at a time; activations in bf16 unless dtype=float32.
    The time needs a peak: a `gpu` of GPUS, or `peak_tflops`."""
    from ..train.distributed import Context, check, memory_per_process
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus} is invalid: give a number of GPUs >= 1")
    if gpu is not None and peak_tflops is not None:
        raise ConfigError("give --gpu NAME or --peak-tflops X, not both")
    if gpu is not None and gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu!r} is not known; choose {', '.join(GPUS)}, or give "
                          "its dense bf16 peak with --peak-tflops")
    if peak_tflops is not None and not peak_tflops > 0:
        raise ConfigError(f"--peak-tflops {peak_tflops} is invalid: give the GPU's peak, > 0")
    if not 0 < mfu <= 1:
        raise ConfigError(f"--mfu {mfu} is invalid: give a fraction of the peak in (0, 1]")
    strategy = "single" if gpus == 1 else strategy
    check(train_cfg, Context(world=gpus, strategy=strategy))  # the batch splits evenly
    T = b["tokens"]
    rows = train_cfg.batch_size // gpus
    memory = memory_per_process(model, strategy, gpus, batch=train_cfg.batch_size, context=T)
    act_bytes = 4 if train_cfg.dtype == "float32" else 2
    per_token = b["total"]["activations_fp32"] / 4 / (b["batch"] * T)
    memory["activations"] = act_bytes * per_token * rows * T
    memory["total"] = sum(memory[k] for k in ("weights", "gradients", "adamw_moments",
                                              "gathered", "activations"))
    tokens = train_cfg.batch_size * train_cfg.grad_accum * T
    flops = b["total"]["training_flops"]
    peak = GPUS[gpu] if gpu is not None else None if peak_tflops is None else peak_tflops * 1e12
    out = {"gpus": gpus, "strategy": strategy, "tokens_per_step": tokens,
           "batch_size": train_cfg.batch_size, "grad_accum": train_cfg.grad_accum,
           "rows_per_gpu": rows, "activations_dtype": "float32" if act_bytes == 4 else
           "bfloat16", "memory_per_gpu": memory, "training_flops_per_token": flops,
           "gpu": gpu, "peak_flops": peak, "mfu": mfu, "max_steps": train_cfg.max_steps}
    if peak is not None:
        step = tokens * flops / (gpus * peak * mfu)
        out.update(step_seconds=step, tokens_per_second=tokens / step,
                   run_hours=train_cfg.max_steps * step / 3600)
    return out


def format_budget(b: dict) -> str:
    """The budget as a plain-text table (counts in millions, memory in MB = 10^6 bytes)."""
    kinds = ("weights", "gradients", "adamw", "activations")
    what = f"preset {b['preset']}'s {b['task']} model (built on the meta device)" \
        if b.get("preset") else f"{b['task']} model"
    recompute = (f", activation checkpointing every {b['activation_checkpointing']} block(s)"
                 if b.get("activation_checkpointing") else "")
    lines = [f"{what}, batches of {b['batch']} x {b['tokens']} tokens{recompute}",
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


def format_plan(p: dict) -> str:
    """The plan in a few lines: the step, memory per GPU in GB (10^9 bytes), time per step."""
    m = p["memory_per_gpu"]
    where = f"{p['gpus']} GPUs ({p['strategy']})" if p["gpus"] > 1 else "1 GPU"
    lines = [f"on {where}: a step is {p['tokens_per_step']:,} tokens (batch_size "
             f"{p['batch_size']} x grad_accum {p['grad_accum']}), {p['rows_per_gpu']} "
             "sequences per GPU at a time",
             f"memory per GPU, GB: weights {m['weights'] / 1e9:.2f} + gradients "
             f"{m['gradients'] / 1e9:.2f} + AdamW {m['adamw_moments'] / 1e9:.2f} + gathered "
             f"{m['gathered'] / 1e9:.2f} + activations {m['activations'] / 1e9:.2f} "
             f"({p['activations_dtype']}) = {m['total'] / 1e9:.2f}"]
    if p["peak_flops"] is None:
        lines.append("time per step: give --gpu a100|h100|h200 or --peak-tflops X")
        return "\n".join(lines)
    name = p["gpu"].upper() if p["gpu"] else "GPU"
    lines.append(f"time per step on {p['gpus']} x {name} ({p['peak_flops'] / 1e12:,.0f} "
                 f"TFLOP/s dense bf16) at {p['mfu']:.0%} MFU (assumed): "
                 f"{p['tokens_per_step']:,} tokens x "
                 f"{p['training_flops_per_token'] / 1e9:.3f} GFLOP / (GPUs x peak x MFU) = "
                 f"{p['step_seconds']:.3f} s, {p['tokens_per_second'] / 1e6:.2f}M tokens/s; "
                 f"{p['max_steps']:,} steps: {p['run_hours']:.2f} h")
    return "\n".join(lines)
