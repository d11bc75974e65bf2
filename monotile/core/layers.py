"""Norms, MLPs and embeddings: the pieces a Transformer block is made of.

LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * g + b      (Ba et al. 2016)
RMSNorm(x)   = x / sqrt(mean(x^2) + eps) * g                    (Zhang & Sennrich 2019)
GELU MLP     = W2 gelu(W1 x), gelu(x) = x Phi(x)                (GPT-2 uses the tanh approximation)
SwiGLU MLP   = W2 (silu(W1 x) * W3 x)                           (Shazeer 2020, Llama)
DropPath     = x * b / (1 - p), b ~ Bernoulli(1 - p) per sample  (stochastic depth, Huang 2016)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias, over the last dimension; bias optional."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, over the last dimension; computed in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # PyTorch's own op: the same formula in fp32 for bf16 and fp16 inputs too (tested
        # equal to the written-out one), in one call instead of six (decoding runs 61 a token)
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


def make_norm(kind: str, dim: int, eps: float, bias: bool) -> nn.Module:
    match kind:
        case "layernorm":
            return LayerNorm(dim, eps, bias)
        case "rmsnorm":
            return RMSNorm(dim, eps)
    raise ValueError(f"unknown norm {kind!r}")


class GeluMLP(nn.Module):
    """fc2(gelu(fc1(x))): GPT-2's feed-forward, d -> d_ff -> d.

    approximate="none" is the exact x Phi(x) (erf); "tanh" is GPT-2's approximation
    0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), kept for imported GPT-2 weights."""

    def __init__(self, dim: int, hidden: int, bias: bool, approximate: str = "none"):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=bias)
        self.fc2 = nn.Linear(hidden, dim, bias=bias)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x): Llama's gated feed-forward. w1 and w3 are one matmul (gate_up)."""

    def __init__(self, dim: int, hidden: int, bias: bool):
        super().__init__()
        self.hidden = hidden
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=bias)  # [w1; w3]
        self.down = nn.Linear(hidden, dim, bias=bias)          # w2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).split(self.hidden, dim=-1)
        return self.down(F.silu(gate) * up)


def make_mlp(kind: str, dim: int, hidden: int, bias: bool) -> nn.Module:
    match kind:
        case "gelu":
            return GeluMLP(dim, hidden, bias)
        case "gelu_tanh":
            return GeluMLP(dim, hidden, bias, approximate="tanh")
        case "swiglu":
            return SwiGLU(dim, hidden, bias)
    raise ValueError(f"unknown mlp {kind!r}")


class DropPath(nn.Module):
    """Stochastic depth on a residual branch: during training each sample's branch output is
    dropped with probability p and scaled by 1 / (1 - p) otherwise, so its expectation is
    unchanged; at evaluation it is the identity (Huang et al. 2016; timm's DropPath)."""

    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.size(0),) + (1,) * (x.dim() - 1)).bernoulli_(1.0 - self.p)
        return x * keep / (1.0 - self.p)
