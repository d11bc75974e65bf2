"""Weight-only int8 quantisation for inference, one scale per output channel.

    s_i = max_j |W_ij| / 127,   Q_ij = round(W_ij / s_i) in [-127, 127],   W ~ s_i Q_ij
    y = x W^T + b  ~  (x Q^T) * s + b

Every Linear and Embedding of the model keeps Q (int8) and s (fp32): a quarter of the bytes, and
so a quarter of the memory traffic a decoding step spends reading weights. A tied embedding and
output head share one Q and s. On CPU the product runs in PyTorch's int8-weight kernel
(`torch._weight_int8pack_mm`, the one gpt-fast and torchao use) with bf16 activations; where
that kernel is missing or does not fit (inputs of a multiple of 16 features only), Q is
turned back into W ~ s Q for each product. Activations, norms and
everything else stay as they were.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (Q int8 (N, K), s fp32 (N,)) with W ~ s[:, None] Q."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _int8_kernel_fits(device: torch.device, in_features: int) -> bool:
    """PyTorch's CPU kernel is right only for inputs of a multiple of 16 features (others give
    NaN or crash on AVX-512 CPUs); the rest dequantize."""
    return (device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")
            and in_features % 16 == 0)


class Int8Linear(nn.Module):
    """y = (x Q^T) * s + b with Q int8 and s per output channel (the buffers weight_int8, scale)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features,
                                                        dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight_int8, layer.scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer.to(linear.weight.device)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _int8_kernel_fits(x.device, self.in_features):
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale.to(torch.bfloat16))
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Embedding(nn.Module):
    """Rows of s Q looked up by token id: E[i] ~ s_i Q_i."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim,
                                                        dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[idx].float() * self.scale[idx][..., None]


def quantize_int8(model: nn.Module) -> list[str]:
    """Replace every Linear and Embedding of `model` by its int8 form, in place; a head tied to
    an embedding shares its Q and s. Returns the names replaced."""
    done: dict[int, nn.Module] = {}  # id(float weight) -> its int8 module, for tied weights
    names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding):
                new = Int8Embedding(child.num_embeddings, child.embedding_dim)
                new.weight_int8, new.scale = quantize_rows(child.weight)
                new.to(child.weight.device)
            elif isinstance(child, nn.Linear):
                new = Int8Linear.from_linear(child)
            else:
                continue
            shared = done.get(id(child.weight))
            if shared is not None:  # tied: one Q and s for both
                new.weight_int8, new.scale = shared.weight_int8, shared.scale
            done.setdefault(id(child.weight), new)
            setattr(parent, child_name, new)
            names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes of what the model saves (its parameters and persistent buffers), a tensor shared
    by two names counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total
