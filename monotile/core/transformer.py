"""The Transformer trunk: a stack of pre-norm blocks over tokens (B, T, d).

Block:  h = x + Attention(Norm(x));  out = h + MLP(Norm(h))             (pre-norm, GPT-2)
        with cross-attention (a decoder): h = x + Attention(Norm(x)); h = h + Cross(Norm(h), m);
        out = h + MLP(Norm(h)), m the encoder's output                  (Vaswani et al. 2017)
Trunk:  Norm(Block_L(... Block_1(x + P) ...)), P the learned positions when positions="learned"
Init:   every weight ~ N(0, 0.02), residual projections ~ N(0, 0.02 / sqrt(2 L)), biases 0 (GPT-2)
Cost:   training FLOPs per token = 6 N + 12 L d T (N matmul parameters, T context; PaLM App. B);
        the forward pass is a third of that.
Memory: activation checkpointing every k-th block (Chen et al. 2016): such a block keeps only its
        input x (d per token) for backward and runs its forward again there, so r = L // k
        blocks cost one more forward each, and backward holds (L - r + 1) blocks' activations
        (the others, and the one being recomputed) plus r d per token.

The trunk knows nothing about modalities: a modality turns its input into tokens, calls the
trunk causally or bidirectionally, and reads the result with its own head.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import ConfigError
from .attention import (ATTENTION_IMPLS, ROPE_SCALINGS, KVCache, SelfAttention, qkv_rotations,
                        rope_frequencies)
from .layers import DropPath, make_mlp, make_norm


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Dimensions and choices of the trunk; GPT-2-style and Llama-style blocks by settings only."""

    vocab_size: int = 0           # set by the modality (tokenizer size for text); 0 = no vocabulary
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (multi-head)
    d_model: int = 128
    d_ff: int | None = None       # None: 4 d for gelu, the multiple of 32 nearest 8/3 d for swiglu
    context: int = 64             # the longest sequence the model sees (block size)
    norm: str = "layernorm"       # layernorm | rmsnorm
    norm_eps: float = 1e-5
    mlp: str = "gelu"             # gelu (exact) | gelu_tanh (GPT-2) | swiglu
    positions: str = "learned"    # learned | rope | none
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Hugging Face's rope_scaling: linear | llama3
    bias: bool = True
    qkv_bias: bool | None = None  # biases on q, k, v alone (Qwen2); None = as `bias`
    norm_position: str = "pre"    # pre (GPT-2, Llama: a final norm) | post (BERT: none)
    embed_norm: bool = False      # a norm over the embeddings plus positions (BERT)
    tie_embeddings: bool = True
    dropout: float = 0.0
    drop_path: float = 0.0        # stochastic depth of the last block; block i gets i/(L-1) of it
    cross_attention: bool = False  # each block also attends to an encoder's output (a decoder)
    attention: str = "sdpa"       # sdpa (PyTorch's fused kernel) | math (written-out reference)
    activation_checkpointing: int = 0  # k: training recomputes every k-th block's activations
                                  # in backward instead of keeping them (1: every block); 0 off

    def __post_init__(self):
        def bad(name, value, fix):
            raise ConfigError(f"{name}={value!r} is invalid: {fix}")
        for name in ("n_layer", "n_head", "d_model", "context"):
            if getattr(self, name) <= 0:
                bad(name, getattr(self, name), "it must be a positive integer")
        if self.vocab_size < 0:
            bad("vocab_size", self.vocab_size, "it must be >= 0")
        if self.d_model % self.n_head:
            bad("n_head", self.n_head, f"it must divide d_model={self.d_model}")
        if (self.d_model // self.n_head) % 2 and self.positions == "rope":
            bad("n_head", self.n_head, "RoPE needs an even head size d_model / n_head")
        kv = self.kv_heads
        if kv <= 0 or self.n_head % kv:
            bad("n_kv_head", self.n_kv_head, f"it must divide n_head={self.n_head}")
        if self.d_ff is not None and self.d_ff <= 0:
            bad("d_ff", self.d_ff, "it must be a positive integer")
        if self.norm not in ("layernorm", "rmsnorm"):
            bad("norm", self.norm, "choose layernorm or rmsnorm")
        if self.mlp not in ("gelu", "gelu_tanh", "swiglu"):
            bad("mlp", self.mlp, "choose gelu, gelu_tanh or swiglu")
        if self.positions not in ("learned", "rope", "none"):
            bad("positions", self.positions, "choose learned, rope or none")
        if not 0.0 <= self.dropout < 1.0:
            bad("dropout", self.dropout, "it must be in [0, 1)")
        if not 0.0 <= self.drop_path < 1.0:
            bad("drop_path", self.drop_path, "it must be in [0, 1)")
        if self.rope_scaling and self.rope_scaling.get(
                "rope_type", self.rope_scaling.get("type")) not in ROPE_SCALINGS:
            bad("rope_scaling", self.rope_scaling, f"supported: {', '.join(ROPE_SCALINGS)}")
        if self.attention not in ATTENTION_IMPLS:
            bad("attention", self.attention, "choose sdpa or math")
        if self.norm_position not in ("pre", "post"):
            bad("norm_position", self.norm_position, "choose pre or post")
        if self.norm_eps <= 0 or self.rope_theta <= 0:
            bad("norm_eps/rope_theta", (self.norm_eps, self.rope_theta), "both must be > 0")
        if not 0 <= self.activation_checkpointing <= self.n_layer:
            bad("activation_checkpointing", self.activation_checkpointing,
                f"give 0 (off) or k in 1..n_layer={self.n_layer}: every k-th block recomputed")

    @property
    def kv_heads(self) -> int:
        return self.n_head if self.n_kv_head is None else self.n_kv_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def hidden(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp != "swiglu":
            return 4 * self.d_model
        # SwiGLU: 8/3 d rounded to a multiple of 32 has the parameters of a 4 d GELU MLP
        return 32 * max(1, round(8 * self.d_model / 3 / 32))

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)


class Block(nn.Module):
    """h = x + attn(norm1(x)); out = h + mlp(norm2(h)); each branch through DropPath when
    stochastic depth is on. Post-norm (BERT, 2018): h = norm1(x + attn(x));
    out = norm2(h + mlp(h)). With cfg.cross_attention a decoder block: between the two,
    h = h + cross_attn(norm_cross(h), memory) (post-norm: h = norm_cross(h + cross_attn(h)))."""

    def __init__(self, cfg: ModelConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.bias, cfg.dropout,
                                  qkv_bias=cfg.qkv_bias, impl=cfg.attention)
        self.norm_cross = self.cross_attn = None
        if cfg.cross_attention:
            self.norm_cross = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
            self.cross_attn = SelfAttention(cfg.d_model, cfg.n_head, cfg.kv_heads, cfg.bias,
                                            cfg.dropout, qkv_bias=cfg.qkv_bias, cross=True,
                                            impl=cfg.attention)
        self.norm2 = make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
        self.mlp = make_mlp(cfg.mlp, cfg.d_model, cfg.hidden, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)
        self.drop_path = DropPath(drop_path)
        self.post_norm = cfg.norm_position == "post"
        # a one-token decoding step in one native call (infer/native.py block_step), where
        # infer/convert.py puts one for inference: the same formula as below
        self.one_token: Callable | None = None

    def forward(self, x, *, rope=None, causal=True, key_padding=None, cache=None, pos=0,
                memory=None, cross_cache=None, rows=None):
        """`memory` (B, Tm, d) is the encoder's output the cross-attention reads (kept in
        `cross_cache` when decoding step by step). `rows` (the indices of key_padding's real
        tokens in x's (B T) rows, Transformer.forward gives it at inference): the MLP's half
        runs on those rows only; a padded row keeps the attention half's output, which no
        real token reads (its key is masked)."""
        if rows is not None:
            h = self._attention_half(x, rope, causal, key_padding, cache, pos, memory,
                                     cross_cache).flatten(0, 1)
            return h.index_copy(0, rows, self._mlp_half(h.index_select(0, rows))).view_as(x)
        if (self.one_token is not None and cache is not None and x.size(1) == 1
                and key_padding is None and not torch.is_tensor(pos) and not self.training):
            return self.one_token(x, cache, pos, rope)
        x = self._attention_half(x, rope, causal, key_padding, cache, pos, memory, cross_cache)
        return self._mlp_half(x.flatten(0, 1)).view_as(x)

    def _attention_half(self, x, rope, causal, key_padding, cache, pos, memory, cross_cache):
        """x + attend(x) (and the cross-attention's), normalised after (post-norm) or
        before (pre-norm)."""
        if self.post_norm:
            x = self.norm1(x + self.drop_path(self.attn(x, rope=rope, causal=causal,
                                                        key_padding=key_padding, cache=cache,
                                                        pos=pos)))
            if self.cross_attn is not None:
                x = self.norm_cross(x + self.drop_path(self.cross_attn(
                    x, memory=memory, cache=cross_cache)))
            return x
        # each norm reads x as rows (B T, d), and the products it feeds get those rows, not
        # a (B, T, d) view of them: compiled, a view of a one-token step's rows has a stride
        # of 0 that PyTorch's matrix product copies its input for (91 copies a SmolLM2 step)
        x = x + self.drop_path(self.attn(self.norm1(x.flatten(0, 1)).view_as(x), rope=rope,
                                         causal=causal, key_padding=key_padding, cache=cache,
                                         pos=pos))
        if self.cross_attn is not None:
            x = x + self.drop_path(self.cross_attn(self.norm_cross(x), memory=memory,
                                                   cache=cross_cache))
        return x

    def _mlp_half(self, h):
        """norm(h + mlp(h)) (post-norm) or h + mlp(norm(h)) (pre-norm) for rows h (N, d)."""
        if self.post_norm:
            return self.norm2(h + self.drop_path(self.dropout(self.mlp(h))))
        return h + self.drop_path(self.dropout(self.mlp(self.norm2(h))))


class Transformer(nn.Module):
    """The trunk: (B, T, d) tokens -> (B, T, d) features, causal or bidirectional."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.pos_emb = (nn.Parameter(torch.zeros(cfg.context, cfg.d_model))
                        if cfg.positions == "learned" else None)
        self.drop = nn.Dropout(cfg.dropout)
        # stochastic depth grows linearly with depth: 0 for the first block, drop_path for the last
        rates = [cfg.drop_path * i / max(1, cfg.n_layer - 1) for i in range(cfg.n_layer)]
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        # pre-norm ends with a norm; post-norm blocks end normalised already
        self.norm = (make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
                     if cfg.norm_position == "pre" else nn.Identity())
        self.embed_norm = (make_norm(cfg.norm, cfg.d_model, cfg.norm_eps, cfg.bias)
                           if cfg.embed_norm else None)
        # the KV cache's dtype, where not the weights': int8 and int4 decoding keep it in bf16
        # (infer/convert.py), as llama.cpp keeps its f16
        self.cache_dtype: torch.dtype | None = None
        # the rotation table (context, d_head/2, 2): a buffer, so that .to(device), .cuda() and
        # DDP/FSDP move it with the weights; not saved, since the config determines it
        self.register_buffer("rope", self._rope_table(torch.get_default_device()),
                             persistent=False)

    def _rope_table(self, device, rows: int | None = None) -> torch.Tensor | None:
        """cos, sin of p theta_j in fp32 for p < rows (default: the context) on `device`, or
        None without RoPE; computed on the CPU, then moved, so that every device holds the
        same numbers. A shorter table is the first rows of the whole one, bit for bit (each
        entry rounded once from float64: rope_frequencies)."""
        cfg = self.cfg
        if cfg.positions != "rope":
            return None
        rows = cfg.context if rows is None else min(rows, cfg.context)
        if torch.device(device).type == "meta":  # shapes only (a model sized before building)
            return torch.empty(rows, cfg.head_dim // 2, 2, device="meta")
        with torch.device("cpu"):
            table = rope_frequencies(cfg.head_dim, rows, cfg.rope_theta, cfg.rope_scaling)
        return table.to(device)

    def _apply(self, fn, recurse=True):
        """nn.Module._apply (under .to, .cuda, .half, .to_empty), then the rope table made anew
        in fp32 on the device it went to: a bf16 table would be off by up to ~0.4 % of each
        cos and sin, and to_empty (meta-device init) leaves it uninitialised."""
        super()._apply(fn, recurse)
        if self.rope is not None:
            self.rope = self._rope_table(self.rope.device, self.rope.size(0))
        return self

    def keep_positions(self, positions: int) -> None:
        """Keep the rotations of positions < `positions` only, for inference (infer/convert.py):
        a 131,072-token context's table is 32 MiB at d_head 64, SmolLM2's 8,192 2 MiB. A
        longer sequence, or a cache for more positions, makes it longer again
        (reserve_positions; a server's cache for the whole context makes it whole)."""
        if self.rope is not None and positions < self.rope.size(0):
            self.rope = self.rope[:max(1, positions)].clone()

    def reserve_positions(self, positions: int) -> None:
        """Rotations for every position < `positions` (at most the context): the table, where
        keep_positions shortened it, made at least twice as long (make_cache calls this for its
        length, so a decoding step never grows it)."""
        if self.rope is not None and self.rope.size(0) < min(positions, self.cfg.context):
            self.rope = self._rope_table(self.rope.device,
                                         max(positions, 2 * self.rope.size(0)))

    def forward(self, x, *, causal: bool = True, key_padding=None, cache=None, pos=0,
                memory=None, cross_cache=None):
        """x: (B, T, d) token embeddings; `cache` a list of KVCache (one per block) and `pos` the
        absolute position of x[:, 0] when decoding step by step: an int for the whole batch, or
        a (B,) tensor of each row's own position for one token per row (T = 1), as a server
        batching requests of different lengths decodes them. With cross-attention, `memory`
        (B, Tm, d) is the encoder's output and `cross_cache` (make_cross_cache) keeps its keys
        and values: give the memory at the first step only."""
        if (memory is not None or cross_cache is not None) and not self.cfg.cross_attention:
            raise ValueError("this trunk has no cross-attention (cross_attention=false); it "
                             "takes no memory")
        if torch.is_tensor(pos):
            return self._forward_rows(x, cache, pos, memory, cross_cache)
        T = x.size(1)
        if (self.pos_emb is not None or self.rope is not None) and pos + T > self.cfg.context:
            raise ValueError(f"sequence of {pos + T} tokens exceeds the context {self.cfg.context}")
        if self.pos_emb is not None:
            x = x + self.pos_emb[pos:pos + T]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        x = self.drop(x)
        rope = None
        if self.rope is not None:  # one table for all blocks, for the positions of x
            if pos + T > self.rope.size(0):  # only where keep_positions shortened it
                self.reserve_positions(pos + T)
            rope = qkv_rotations(self.rope[pos:pos + T], self.cfg.n_head + self.cfg.kv_heads,
                                 self.cfg.kv_heads)
        k = self.cfg.activation_checkpointing  # only where backward follows: never decoding
        recompute = k > 0 and self.training and torch.is_grad_enabled() and cache is None
        # at inference, padded batches (sentences of different lengths) skip the padding in
        # the MLPs: 43 % of all-MiniLM-L6-v2's rows in batches of 32 speeches sentences
        rows = (key_padding.flatten().nonzero()[:, 0]
                if key_padding is not None and not self.training and cache is None else None)
        for i, block in enumerate(self.blocks):
            if recompute and (i + 1) % k == 0:  # keeps x alone; backward runs the block again
                block = partial(checkpoint, block, use_reentrant=False)
            x = block(x, rope=rope, causal=causal, key_padding=key_padding,
                      cache=None if cache is None else cache[i], pos=pos, memory=memory,
                      cross_cache=None if cross_cache is None else cross_cache[i], rows=rows)
        return self.norm(x.flatten(0, 1)).view_as(x)  # rows, as in Block.forward

    def _forward_rows(self, x, cache, pos: torch.Tensor, memory=None, cross_cache=None):
        """One token per row at its own position pos[b]: row b's query sees its keys 0..pos[b]
        (a key mask instead of the causal one, since the rows' lengths differ)."""
        if cache is None or x.size(1) != 1 or pos.shape != (x.size(0),):
            raise ValueError("per-row positions take one token per row, a cache and pos (B,)")
        last = int(pos.max())  # one read of the device's value a step
        if last >= self.cfg.context:
            raise ValueError(f"position {last} is past the context {self.cfg.context}")
        pos = pos.to(x.device)
        if self.pos_emb is not None:
            x = x + self.pos_emb[pos][:, None]
        if self.embed_norm is not None:
            x = self.embed_norm(x)
        rope = None
        if self.rope is not None:
            self.reserve_positions(last + 1)
            rope = qkv_rotations(self.rope[pos], self.cfg.n_head + self.cfg.kv_heads,
                                 self.cfg.kv_heads)[:, None]  # (B, 1, heads, d/2, 2)
        seen = None
        for i, block in enumerate(self.blocks):
            if block.one_token is not None and not self.training and memory is None:
                # the native step reads row b's keys 0..pos[b] itself: `seen`'s mask
                x = block.one_token(x, cache[i], pos, rope)
                continue
            if seen is None:
                seen = torch.arange(last + 1, device=x.device)[None] <= pos[:, None]  # (B, Tk)
            x = block(x, rope=rope, causal=False, key_padding=seen, cache=cache[i], pos=pos,
                      memory=memory, cross_cache=None if cross_cache is None else cross_cache[i])
        return self.norm(x)

    def make_cache(self, batch: int, max_len: int | None = None, dtype=None) -> list[KVCache]:
        """One empty KVCache per block, for decoding up to max_len (default: the context), in
        `dtype` (default: cache_dtype where set, else the weights')."""
        cfg = self.cfg
        p = next(self.parameters())
        self.reserve_positions(max_len or cfg.context)
        return [KVCache(batch, cfg.kv_heads, max_len or cfg.context, cfg.head_dim,
                        dtype or self.cache_dtype or p.dtype, p.device)
                for _ in range(cfg.n_layer)]

    def make_cross_cache(self, batch: int, memory_len: int, dtype=None) -> list[KVCache]:
        """One KVCache per block for the cross-attention's keys and values of a memory of
        memory_len positions (filled at the first decoding step, then only read)."""
        cfg = self.cfg
        p = next(self.parameters())
        return [KVCache(batch, cfg.kv_heads, memory_len, cfg.head_dim, dtype or p.dtype,
                        p.device) for _ in range(cfg.n_layer)]


@contextmanager
def weights_left_uninitialised():
    """Inside the block, torch.nn.init's functions do nothing, so building a model whose every
    weight a checkpoint is about to overwrite skips the random draws (~1.6 s of SmolLM2's
    start-up; Hugging Face's no_init_weights does the same). Only for models then loaded in
    full: load_model_weights refuses a checkpoint that lacks any of the model's tensors."""
    names = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_",
             "xavier_uniform_", "xavier_normal_", "zeros_", "ones_", "constant_", "orthogonal_")
    originals = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(nn.init, name, fn)


def recomputed_blocks(cfg: ModelConfig) -> int:
    """Blocks that activation checkpointing runs twice in a training step: every k-th of the
    L, r = L // k (k = cfg.activation_checkpointing; 0 when it is off)."""
    k = cfg.activation_checkpointing
    return cfg.n_layer // k if k else 0


def init_weights(model: nn.Module, n_layer: int, std: float = 0.02, *,
                 scaled_residuals: bool = True) -> None:
    """GPT-2 init: Linear and Embedding weights ~ N(0, std), biases 0, norms 1, and the
    residual projections (attention wo, MLP fc2/down) ~ N(0, std / sqrt(2 n_layer)).
    scaled_residuals=False keeps those at N(0, std) too (ViT's init, as in transformers)."""
    for name, p in model.named_parameters():
        if p.dim() < 2:
            if name.endswith("weight"):  # norm gains
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
            continue
        last = name.rsplit(".", 2)[-2] if "." in name else name
        scaled = scaled_residuals and last in ("wo", "fc2", "down")
        nn.init.normal_(p, mean=0.0, std=std / math.sqrt(2 * n_layer) if scaled else std)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of distinct parameters (a tied weight counts once)."""
    seen = {id(p): p for p in model.parameters() if p.requires_grad or not trainable_only}
    return sum(p.numel() for p in seen.values())


def matmul_parameters(cfg: ModelConfig, head_outputs: int | None = None) -> int:
    """Parameters that multiply an activation once per token: every Linear of the blocks plus
    the output head (vocab_size x d for a language model, or `head_outputs` x d).
    Embedding lookups, norms and biases are not matmuls and are left out; a cross-attention
    counts as a second attention (its k, v projections run over the memory instead)."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * (cfg.n_head + 2 * cfg.kv_heads) * hd + cfg.n_head * hd * d
    attn *= 2 if cfg.cross_attention else 1
    mlp = (3 if cfg.mlp == "swiglu" else 2) * d * cfg.hidden
    out = head_outputs if head_outputs is not None else cfg.vocab_size
    return cfg.n_layer * (attn + mlp) + out * d


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None, *, training: bool = True,
                    head_outputs: int | None = None) -> float:
    """Training FLOPs per token = 6 N + 12 L d T (forward 2 N + 4 L d T, backward twice that).

    N = matmul_parameters(cfg); 12 L d T counts the attention scores Q K^T and the weighted sum
    A V (2 matmuls of 2 d T FLOPs each per token per layer, times 3 for forward + backward),
    with T the full sequence length as nanoGPT and PaLM count it (the causal mask is ignored).
    """
    T = cfg.context if seq_len is None else seq_len
    n = matmul_parameters(cfg, head_outputs)
    forward = 2 * n + 4 * cfg.n_layer * cfg.d_model * T
    return 3 * forward if training else forward
