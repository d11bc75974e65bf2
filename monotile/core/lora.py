"""LoRA: low-rank adapters beside frozen linear layers (Hu et al. 2021).

    h = W x + (alpha / r) B A x,    A (r x in) Kaiming-uniform,  B (out x r) = 0
Training starts from the base model exactly (B = 0) and updates only A and B: r (in + out)
numbers per layer instead of in x out. Merging folds the adapter into the weight:
    W' = W + (alpha / r) B A,
after which the model is a plain model again, as fast as the base.

monotile's attention has one fused q|k|v projection; the targets q, k and v adapt only those
rows of it (B then has rows for them alone), which is the original paper's Wq and Wv.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

QKV = ("q", "k", "v")


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus (alpha / r) B A, optionally on a subset `rows` of its outputs."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float,
                 rows: torch.Tensor | None = None):
        super().__init__()
        self.base = base
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        n_out = base.out_features if rows is None else len(rows)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features,
                                               device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(n_out, rank, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear and PEFT
        self.register_buffer("rows", rows, persistent=False)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A as an (out, in) matrix, zero on the rows not adapted."""
        delta = self.scale * (self.lora_B @ self.lora_A)
        if self.rows is None:
            return delta
        full = delta.new_zeros(self.base.out_features, self.base.in_features)
        return full.index_copy(0, self.rows, delta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        z = self.scale * F.linear(F.linear(x, self.lora_A.to(x.dtype)), self.lora_B.to(x.dtype))
        if self.rows is None:
            return y + z
        return y.index_add(-1, self.rows, z.to(y.dtype))


def _qkv_rows(module: nn.Linear, parent: nn.Module, which: list[str]) -> torch.Tensor:
    """Output rows of a fused q|k|v projection that belong to the heads in `which`."""
    H, Hkv, hd = parent.n_head, parent.n_kv_head, parent.head_dim
    spans = {"q": (0, H * hd), "k": (H * hd, (H + Hkv) * hd),
             "v": ((H + Hkv) * hd, (H + 2 * Hkv) * hd)}
    return torch.cat([torch.arange(*spans[w]) for w in which]).to(module.weight.device)


def linear_names(model: nn.Module) -> list[str]:
    """The short names of the model's Linear layers (the last part of their dotted names)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, nn.Linear)})


def add_lora(model: nn.Module, rank: int, alpha: float, targets: list[str]) -> list[str]:
    """Freeze `model` and put a LoRA adapter on every Linear whose name (or dotted suffix) is in
    `targets`; q, k, v adapt those rows of a fused qkv projection. Returns the adapted names."""
    if rank <= 0:
        raise ConfigError(f"--lora-rank {rank} is invalid: give a positive rank, e.g. 8")
    if alpha <= 0:
        raise ConfigError(f"--lora-alpha {alpha} is invalid: it must be > 0 (e.g. the rank)")
    qkv_parts = [t for t in QKV if t in targets]
    plain = [t for t in targets if t not in QKV]
    tied = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    model.requires_grad_(False)
    adapted = []
    for name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            full = f"{name}.{child_name}" if name else child_name
            rows = None
            if any(full == t or full.endswith("." + t) for t in plain):
                pass
            elif child_name == "qkv" and qkv_parts:
                rows = _qkv_rows(child, parent, qkv_parts)
            else:
                continue
            if id(child.weight) in tied:
                raise ConfigError(f"--lora-targets: {full} shares its weight with the token "
                                  "embedding (tie_embeddings), so an adapter on it would change "
                                  "both; leave it out of the targets")
            setattr(parent, child_name, LoRALinear(child, rank, alpha, rows))
            adapted.append(full)
    if not adapted:
        names = linear_names(model)
        extra = " (and q, k, v for the rows of qkv)" if "qkv" in names else ""
        raise ConfigError(f"--lora-targets {','.join(targets)} matches no linear layer of this "
                          f"model; its layers are: {', '.join(names)}{extra}")
    model.lora = {"rank": rank, "alpha": alpha, "targets": list(targets)}
    return adapted


def lora_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's own tensors, by their names in the model (…qkv.lora_A, …qkv.lora_B)."""
    return {name: p for name, p in model.named_parameters() if ".lora_" in name}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer, W' = W + (alpha / r) B A, and put the plain Linear
    back, so the model has the base's names and shapes again."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                child.base.weight += child.delta_weight().to(child.base.weight.dtype)
                setattr(parent, child_name, child.base)
    if hasattr(model, "lora"):
        del model.lora
    model.requires_grad_(True)
    return model
