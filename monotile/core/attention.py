"""Scaled dot-product attention, its masks, rotary positions and the KV cache.

Attention(Q, K, V) = softmax(Q K^T / sqrt(d_head) + M) V        (Vaswani et al. 2017)
M[i, j] = 0 where query i may see key j, -inf elsewhere (causal: j <= i; padding: key j is real).
Self-attention: Q, K, V = x Wq, x Wk, x Wv. Cross-attention (an encoder-decoder's decoder):
Q = x Wq from the decoder's tokens, K, V = m Wk, m Wv from the encoder's output m (the memory).
Grouped-query attention: n_head query heads share n_kv_head key/value heads, each K/V head
serving n_head / n_kv_head query heads (Ainslie et al. 2023).
RoPE rotates each pair (x_2i, x_2i+1) of q and k by the angle p * theta^(-2i/d) at position p,
so q_m . k_n depends only on m - n (Su et al. 2021).
"""

from __future__ import annotations

import functools
import math
import mmap
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(q_len: int, k_len: int, device=None) -> torch.Tensor:
    """Boolean (q_len, k_len) mask, True where query i may attend to key j.

    The queries are the last q_len positions of the k_len keys (a KV cache holds the rest), so
    query i sits at absolute position k_len - q_len + i and sees keys j <= that position.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    return k_pos <= q_pos


def attention_math(q, k, v, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + M) v written out, the reference for the fused path.

    q: (B, H, Tq, d); k, v: (B, H, Tk, d); mask: bool, broadcastable to (B, H, Tq, Tk).
    A query that may see no key at all gets 0, as in the fused kernel.
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0)  # all -inf rows -> 0
    return weights.to(q.dtype) @ v


ATTENTION_IMPLS = ("sdpa", "math")


def _cpu_attends_in_fp32(q: torch.Tensor, impl: str = "sdpa") -> bool:
    """True for CPU inputs in bf16 or fp16 where gradients are kept or autocast is on
    (training, and its evaluation: see _fp32_on_cpu) or the written-out formula computes,
    and in fp32 under CPU autocast (which would run the kernel in bf16): those are attended
    in fp32."""
    if q.device.type != "cpu":
        return False
    autocast = torch.is_autocast_enabled("cpu")
    if q.dtype in (torch.bfloat16, torch.float16):
        return torch.is_grad_enabled() or autocast or impl == "math"
    return q.dtype == torch.float32 and autocast


def _fp32_on_cpu(attend):
    """`attend(q, k, v, **options)` computed in fp32 with autocast off where
    _cpu_attends_in_fp32(q), the result cast back to q's dtype; elsewhere `attend` as it is,
    q first cast to the dtype of k and v where a 16-bit KV cache holds them under an fp32
    model (int8 and int4 decoding), the result cast back.

    The CPU kernel's bf16 backward is ~5x slower than its fp32 one at these sizes
    (bench/train_text.py), so a bf16 model or a bf16-autocast step would lose there what its
    bf16 matmuls gain; and an fp32 softmax is the more accurate anyway. In inference (no
    gradients, no autocast) the fused kernel reads bf16 as it is, summing in fp32: one
    decoding step's attention over 300 cached positions of SmolLM2's shape took 20 us so, 46
    with the keys and values cast to fp32 first, 24 all in fp32."""
    @functools.wraps(attend)
    def attend_on_cpu_in_fp32(q, k, v, **options):
        if _cpu_attends_in_fp32(q, options.get("impl", "sdpa")):
            with torch.autocast("cpu", enabled=False):
                out = attend(q.float(), k.float(), v.float(), **options)
            return out.to(q.dtype)
        if k.dtype != q.dtype:
            return attend(q.to(k.dtype), k, v, **options).to(q.dtype)
        return attend(q, k, v, **options)
    return attend_on_cpu_in_fp32


@_fp32_on_cpu
def attention(q, k, v, *, mask=None, is_causal=False, impl: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention with grouped-query heads.

    q: (B, H, Tq, d); k, v: (B, Hkv, Tk, d) with H a multiple of Hkv. `mask` is boolean
    (True = may attend). `is_causal` adds the causal mask, aligned so that the Tq queries are
    the last Tq of the Tk positions (as with a KV cache). `impl` is "sdpa" (PyTorch's fused
    kernel, which reads each K/V head for its H / Hkv query heads in place: enable_gqa) or
    "math" (attention_math, on K/V heads repeated); tests prove the two equal.

    On CPU, bf16/fp16 inputs (a bf16 model, or autocast) are attended in fp32 where gradients
    are kept or autocast is on, and the result cast back (_fp32_on_cpu: the CPU kernel's bf16
    backward is ~5x slower than its fp32 one); in inference the fused kernel reads them as
    they are, and keys and values from a 16-bit cache take q in their dtype.
    """
    gqa = q.size(1) != k.size(1)  # each K/V head serves H / Hkv query heads
    if gqa and impl == "math":
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)
    Tq, Tk = q.size(2), k.size(2)
    padded = mask is not None  # only a caller's (padding) mask can leave a query no key
    if is_causal and Tq == 1:  # one query, the last position: it sees every key
        is_causal = False
    if is_causal and (mask is not None or Tq != Tk or impl == "math"):
        causal = causal_mask(Tq, Tk, q.device)
        mask, is_causal = (causal if mask is None else mask & causal), False
    if impl == "math":
        return attention_math(q, k, v, mask)
    if padded:
        # the fused kernel gives a query that sees no key NaN or 0 depending on the backend;
        # let it see all keys, then zero its output, as attention_math does
        empty = ~mask.any(-1, keepdim=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask | empty, enable_gqa=gqa)
        return out.masked_fill(empty, 0.0)
    if mask is not None:  # the causal mask of a KV-cache step
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=gqa)


def rope_frequencies(head_dim: int, max_len: int, theta: float = 10000.0,
                     scaling: dict | None = None) -> torch.Tensor:
    """Rotations e^{i p theta_j}, theta_j = theta^(-2j/head_dim), as a real (max_len, head_dim/2, 2)
    tensor of (cos, sin) pairs: p theta_j in fp32 (as Hugging Face's Llama computes it), its cos
    and sin rounded to fp32; the trunk keeps it in fp32 whatever the model's dtype.
    `scaling` stretches the context as Hugging Face's rope_scaling does: "linear" divides every
    theta_j by `factor`; "llama3" divides the slow ones (wavelength > original / low_freq_factor)
    by `factor`, keeps the fast ones (< original / high_freq_factor), and blends in between."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    if scaling:
        inv_freq = scale_rope(inv_freq, scaling)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)  # (T, d/2)
    # cos and sin of the fp32 angles in float64 by numpy, rounded once: the same table in every
    # process. PyTorch 2.13's cos on CPU gave the first call of some processes errors up to
    # 1.5e-4 in fp32 (half a table's entries; later calls within 1 ulp), and 1-ulp ones even
    # computed in float64
    a = angles.double().cpu().numpy()
    return torch.from_numpy(np.stack([np.cos(a), np.sin(a)], axis=-1).astype(np.float32))


ROPE_SCALINGS = ("linear", "llama3")


def scale_rope(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    kind, factor = scaling.get("rope_type", scaling.get("type")), float(scaling["factor"])
    if kind == "linear":
        return inv_freq / factor
    if kind == "llama3":
        low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        original = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
        smooth = (original / wavelen - low) / (high - low)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= original / high) & (wavelen <= original / low)
        return torch.where(medium, blended, scaled)
    raise ValueError(f"RoPE scaling {kind!r} is not supported; supported: "
                     f"{', '.join(ROPE_SCALINGS)}")


def qkv_rotations(freqs: torch.Tensor, n_rotated: int, n_identity: int) -> torch.Tensor:
    """(T, d/2, 2) rotations -> (T, n_rotated + n_identity, d/2, 2) for the heads of a fused
    q|k|v tensor: the q and k heads rotate, the v heads get the identity (cos 1, sin 0)."""
    T, half, _ = freqs.shape
    identity = freqs.new_zeros(T, n_identity, half, 2)
    identity[..., 0] = 1.0
    return torch.cat([freqs[:, None].expand(T, n_rotated, half, 2), identity], dim=1)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate each pair (x_2j, x_2j+1) of the last dim by the angle p theta_j: as complex numbers,
    (x_2j + i x_2j+1) e^{i p theta_j} (RoFormer, Meta's Llama). x: (..., T, heads, d) with
    freqs (T, heads or 1, d/2, 2), or (..., T, d) with freqs (T, d/2, 2).

    Hugging Face's Llama pairs x_j with x_{j+d/2} instead; the two layouts are the same
    rotation after permuting the rows of Wq and Wk (tests/test_attention.py checks this)."""
    if torch.compiler.is_compiling():  # inductor generates no kernels for complex numbers
        return apply_rope_real(x, freqs)
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (..., d/2) complex
    rotation = torch.view_as_complex(freqs.float())
    return torch.view_as_real(xc * rotation).flatten(-2).type_as(x)


def apply_rope_real(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The same rotation in real arithmetic: (a, b) -> (a cos - b sin, a sin + b cos)."""
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (..., d/2) each
    cos, sin = freqs.float().unbind(-1)
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)

# a CPU cache from this many bytes on is mapped, not filled (zeros_on_touch)
MAPPED_CACHE_BYTES = 1 << 20


def zeros_on_touch(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A CPU tensor of zeros whose memory the system gives page by page as it is first touched
    (an anonymous mapping, zero-filled by the kernel), where torch.zeros writes every byte at
    once: a server's cache for 16 rows of SmolLM2's 8,192 positions is 6 GB in fp32, and what
    becomes resident is what its requests reach."""
    size = math.prod(shape) * dtype.itemsize
    return torch.frombuffer(mmap.mmap(-1, size), dtype=dtype).view(shape)


class KVCache:
    """Preallocated keys and values of one layer, (B, Hkv, max_len, d), written at `pos`.
    On the CPU a large one is zeros_on_touch: memory grows with the positions reached."""

    def __init__(self, batch: int, n_kv_head: int, max_len: int, head_dim: int, dtype, device):
        shape = (batch, n_kv_head, max_len, head_dim)
        lazy = (torch.device(device).type == "cpu"
                and math.prod(shape) * dtype.itemsize >= MAPPED_CACHE_BYTES)
        self.k, self.v = ((zeros_on_touch(shape, dtype), zeros_on_touch(shape, dtype)) if lazy
                          else (torch.zeros(shape, dtype=dtype, device=device),
                                torch.zeros(shape, dtype=dtype, device=device)))

    def update(self, pos, k: torch.Tensor, v: torch.Tensor):
        """Write k, v (B, Hkv, T, d) at positions pos..pos+T-1; return all keys/values so far.
        With pos a (B,) tensor (T = 1), row b's key goes to its own position pos[b], and the
        keys up to the largest position come back (the caller masks each row's tail)."""
        if k.dtype != self.k.dtype:  # a 16-bit cache of an fp32 model
            k, v = k.to(self.k.dtype), v.to(self.v.dtype)
        if torch.is_tensor(pos):
            rows = torch.arange(k.size(0), device=k.device)
            self.k[rows, :, pos] = k[:, :, 0]
            self.v[rows, :, pos] = v[:, :, 0]
            end = int(pos.max()) + 1
        else:
            end = pos + k.size(2)
            self.k[:, :, pos:end] = k
            self.v[:, :, pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def rows(self, start: int, stop: int) -> KVCache:
        """A view of rows start..stop-1: writing to it writes to this cache."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[start:stop], self.v[start:stop]
        return view

    def move_row(self, src: int, dst: int, length: int | None = None) -> None:
        """Copy row src over row dst (a server compacting its batch when a request ends): its
        first `length` positions (the ones it holds; past them a row is masked), or all."""
        end = self.k.size(2) if length is None else length
        self.k[dst, :, :end] = self.k[src, :, :end]
        self.v[dst, :, :end] = self.v[src, :, :end]

    def reorder(self, rows: torch.Tensor) -> None:
        """Row b becomes old row rows[b] (beam search following the beams that survive)."""
        self.k, self.v = self.k[rows], self.v[rows]


@contextmanager
def recorded_attention():
    """Yield a list that fills with (q, k, mask, is_causal) for each attention() call made
    inside the block, in call order (block 0 first; in a decoder block with cross-attention,
    its self-attention then its cross-attention): what `explain` draws and Whisper's word
    timestamps align by."""
    calls = []
    original = globals()["attention"]

    def record(q, k, v, *, mask=None, is_causal=False, impl="sdpa"):
        calls.append((q.detach().float(), k.detach().float(), mask, is_causal))
        return original(q, k, v, mask=mask, is_causal=is_causal, impl=impl)

    globals()["attention"] = record
    try:
        yield calls
    finally:
        globals()["attention"] = original


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) attention: wo(Attention(x Wq, m Wk, m Wv)), m = x.

    q, k and v come from one fused projection `qkv` of width (n_head + 2 n_kv_head) * d_head.
    With cross=True it is cross-attention: m is the `memory` (an encoder's output), q comes
    from `q` over x and k, v from one fused `kv` over m, unmasked. The memory's keys and values
    are computed once per sequence: given `memory` and a `cache` sized to it, they are written
    there, and later calls without `memory` read them back; a cache of one row serves any
    number of rows of x (beams of one recording). `impl` is attention()'s path:
    "sdpa" (fused) or "math" (written out), as ModelConfig.attention says.
    """

    def __init__(self, dim: int, n_head: int, n_kv_head: int, bias: bool, dropout: float = 0.0,
                 qkv_bias: bool | None = None, cross: bool = False, impl: str = "sdpa"):
        super().__init__()
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl {impl!r} is unknown; choose "
                             f"{' or '.join(ATTENTION_IMPLS)}")
        self.n_head, self.n_kv_head = n_head, n_kv_head
        self.head_dim = dim // n_head
        self.cross = cross
        qkv_bias = bias if qkv_bias is None else qkv_bias
        if cross:
            self.q = nn.Linear(dim, n_head * self.head_dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, 2 * n_kv_head * self.head_dim, bias=qkv_bias)
        else:
            self.qkv = nn.Linear(dim, (n_head + 2 * n_kv_head) * self.head_dim, bias=qkv_bias)
        self.wo = nn.Linear(n_head * self.head_dim, dim, bias=bias)
        self.dropout = nn.Dropout(dropout)
        self.impl = impl  # sdpa | math: the same numbers, tested equal
        # one query against a cache, (q, k, v) -> out: infer/convert.py puts native.py's
        # kernel here for a compiled decoding step (PyTorch's is made for many queries)
        self.one_query: Callable | None = None
        # a one-query step's 16-bit cached keys and values cast to fp32 before PyTorch's
        # kernel: infer/convert.py sets it where that measures faster on this CPU
        self.upcast_cache = False

    def forward(self, x, *, rope=None, causal=True, key_padding=None, cache=None, pos=0,
                memory=None):
        B, T, _ = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        if self.cross:
            q, k, v = self._cross_qkv(x, memory, cache)
            causal, key_padding = False, None  # every query sees the whole memory
        else:
            qkv = self.qkv(x).view(B, T, H + 2 * Hkv, hd)  # q heads, then k heads, then v heads
            if rope is not None:  # (T, H + 2 Hkv, hd/2, 2): q, k rotate, v gets the identity
                qkv = apply_rope(qkv, rope)
            q, k, v = qkv.split([H, Hkv, Hkv], dim=2)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T, hd)
            if cache is not None:
                k, v = cache.update(pos, k, v)
        # key_padding (B, Tk): True for real tokens -> (B, 1, 1, Tk), broadcast over heads/queries
        mask = None if key_padding is None else key_padding[:, None, None, :].to(torch.bool)
        if (self.one_query is not None and T == 1 and mask is None and cache is not None
                and not self.cross and not torch.is_tensor(pos)):  # a decoding step's
            y = self.one_query(q, k, v).to(q.dtype)
        elif self.upcast_cache and T == 1 and cache is not None and not self.cross:
            y = attention(q, k.float(), v.float(), mask=mask, is_causal=causal, impl=self.impl)
        elif self.cross and k.size(0) == 1 and B > 1:  # one memory for B rows (beams, samples)
            if T == 1:  # the rows' queries as B queries of one row: k, v read once
                y = attention(q.transpose(0, 2), k, v, impl=self.impl).transpose(0, 2)
            else:
                y = attention(q, k.expand(B, -1, -1, -1), v.expand(B, -1, -1, -1),
                              impl=self.impl)
        else:
            y = attention(q, k, v, mask=mask, is_causal=causal, impl=self.impl)
        y = y.transpose(1, 2).reshape(B, T, H * hd)  # (B, T, H*hd)
        return self.dropout(self.wo(y))

    def _cross_qkv(self, x, memory, cache):
        """q (B, H, T, hd) from x; k, v (B, Hkv, Tm, hd) from the memory, or from the cache the
        first call with the memory filled."""
        B, T, _ = x.shape
        H, Hkv, hd = self.n_head, self.n_kv_head, self.head_dim
        q = self.q(x).view(B, T, H, hd).transpose(1, 2)
        if memory is None:
            if cache is None:
                raise ValueError("cross-attention needs the encoder's output (memory), or a "
                                 "cache that holds its keys and values")
            return q, cache.k, cache.v
        kv = self.kv(memory).view(B, memory.size(1), 2 * Hkv, hd).transpose(1, 2)
        k, v = kv.split([Hkv, Hkv], dim=1)  # (B, Hkv, Tm, hd) each
        if cache is not None:
            k, v = cache.update(0, k, v)
        return q, k, v
