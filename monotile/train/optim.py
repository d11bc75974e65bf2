"""AdamW with decoupled weight decay, and the warmup + cosine learning-rate schedule.

AdamW (Loshchilov & Hutter 2019):
  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)
Schedule: lr(s) = lr_max (s + 1) / warmup for s < warmup, then
  lr_min + (lr_max - lr_min) (1 + cos(pi (s - warmup) / (decay_steps - warmup))) / 2, lr_min after.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of Linear layers; norms, biases and embeddings (token tables,
    position tables, a CLS token) are not decayed: they are 1-D, or added rather than
    multiplied."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = (p.dim() >= 2 and id(p) not in embeddings
                     and not name.endswith(("pos_emb", "cls_token")))
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float, beta1: float,
                   beta2: float, eps: float = 1e-8) -> torch.optim.AdamW:
    device = next(model.parameters()).device.type
    # the fused kernel is one call for all parameters: fastest on CPU and CUDA alike
    fused = device in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(beta1, beta2),
                             eps=eps, fused=fused)


def lr_at(step: int, *, lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """Linear warmup to lr over `warmup` steps, cosine decay to min_lr at `decay_steps`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
