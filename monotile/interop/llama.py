"""The Llama family (`llama`, `mistral`, `qwen2`) as text runs: RoPE with its linear or llama3
scaling, grouped-query attention, SwiGLU, RMSNorm, tied or untied heads, Qwen2's q/k/v biases.

The names and layouts differ; the numbers do not:
- Llama's q_proj, k_proj, v_proj are one fused qkv here (rows q | k | v: H hd, Hkv hd, Hkv hd),
  gate_proj and up_proj one gate_up (rows gate | up).
- Llama rotates the pairs (x_j, x_{j+d/2}) of each head ("rotate_half"); monotile rotates
  (x_2j, x_2j+1). The same rotation after permuting each head's rows of Wq and Wk (and of
  their biases): row 2j <- row j, row 2j+1 <- row j + d/2 (tests/test_attention.py checks
  the identity).
- rotary_emb.inv_freq is recomputed from the config: dropped.
"""

from __future__ import annotations

import torch

from ..core.transformer import ModelConfig
from ..errors import ConfigError
from .adapter import TRUNK_KEYS, Adapter, Pair, Part, fuse, keys_in, keys_out, one, tie
from .causal_lm import CLAIMS, build, files_out, task_in


def half_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (x_j, x_{j+d/2}) pairs to (x_2j, x_2j+1) pairs."""
    hd = w.size(0) // heads
    order = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], 1).flatten()
    return w.reshape(heads, hd, *w.shape[1:])[:, order].reshape(w.shape)


def pairs_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    """The inverse of half_to_pairs."""
    hd = w.size(0) // heads
    order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    return w.reshape(heads, hd, *w.shape[1:])[:, order].reshape(w.shape)


def rotate(heads: str) -> Pair:
    """The rotate-half permutation of a projection's rows, `heads` (a dims name) at a time."""
    return Pair(lambda w, dims: half_to_pairs(w, dims[heads]),
                lambda w, dims: pairs_to_half(w, dims[heads]))


def qkv(part: str, cols: tuple, **rule):
    a = "model.layers.{i}.self_attn."
    return fuse(f"trunk.blocks.{{i}}.attn.qkv.{part}",
                Part(f"{a}q_proj.{part}", ("q", *cols), rotate("heads")),
                Part(f"{a}k_proj.{part}", ("kv", *cols), rotate("kv_heads")),
                Part(f"{a}v_proj.{part}", ("kv", *cols)), **rule)


B, H = "trunk.blocks.{i}.", "model.layers.{i}."
RULES = (
    one("tok_emb.weight", "model.embed_tokens.weight", ("V", "d")),
    one(B + "norm1.weight", H + "input_layernorm.weight", ("d",)),
    one(B + "norm2.weight", H + "post_attention_layernorm.weight", ("d",)),
    qkv("weight", ("d",)),
    qkv("bias", (), when="qkv_bias"),
    one(B + "attn.wo.weight", H + "self_attn.o_proj.weight", ("d", "q")),
    fuse(B + "mlp.gate_up.weight", Part(H + "mlp.gate_proj.weight", ("ff", "d")),
         Part(H + "mlp.up_proj.weight", ("ff", "d"))),
    one(B + "mlp.down.weight", H + "mlp.down_proj.weight", ("d", "ff")),
    one("trunk.norm.weight", "model.norm.weight", ("d",)),
    one("head.weight", "lm_head.weight", ("V", "d"), when="untied"),
    tie("head.weight", "tok_emb.weight", when="tied"),
)

KEYS = (("vocab_size", "vocab_size"), *TRUNK_KEYS, ("context", "max_position_embeddings"),
        ("n_kv_head", "num_key_value_heads", None), ("norm_eps", "rms_norm_eps", 1e-6),
        ("tie_embeddings", "tie_word_embeddings", False))
FIXED = {"norm": "rmsnorm", "mlp": "swiglu", "positions": "rope", "bias": False}
ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def rope(config: dict) -> tuple[float, dict | None]:
    """rope_theta and the scaling, from either transformers' old keys or rope_parameters."""
    params = dict(config.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", config.get("rope_theta", 10000.0)))
    scaling = config.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind == "default":
        return theta, None
    if kind not in ("linear", "llama3"):
        raise ConfigError(f"RoPE scaling {kind!r} is not supported (supported: linear, llama3); "
                          "this checkpoint cannot be imported")
    return theta, {"rope_type": kind, **{k: scaling[k] for k in ROPE_KEYS if k in scaling}}


def model_in(config: dict) -> ModelConfig:
    d, heads = config["hidden_size"], config["num_attention_heads"]
    if config.get("head_dim") not in (None, d // heads):
        raise ConfigError(f"head_dim={config['head_dim']} differs from hidden_size / heads = "
                          f"{d // heads}; the trunk's heads split the width evenly")
    if config.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"hidden_act={config['hidden_act']!r} is not supported (SwiGLU uses "
                          "silu)")
    window = config.get("sliding_window") if config.get("use_sliding_window", True) else None
    if window is not None and window < config["max_position_embeddings"]:
        raise ConfigError(f"sliding_window={window} is not supported (the trunk attends to "
                          "the whole context)")
    if config.get("mlp_bias"):
        raise ConfigError("mlp_bias=true is not supported")
    theta, scaling = rope(config)
    qwen2 = config["model_type"] == "qwen2"
    return ModelConfig(**keys_in(config, KEYS), **FIXED, rope_theta=theta,
                       rope_scaling=scaling,
                       qkv_bias=bool(config.get("attention_bias", True)) if qwen2 else None)


def config_out(cfg: ModelConfig, text_cfg, kept: dict) -> tuple[dict, dict]:
    qkv_bias = bool(cfg.qkv_bias)
    return {"model_type": "qwen2" if qkv_bias else "llama",
            "architectures": ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"],
            **keys_out(cfg, KEYS), "head_dim": cfg.head_dim, "hidden_act": "silu",
            "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
            "attention_bias": qkv_bias}, files_out(text_cfg)


LLAMA = Adapter(
    name="Llama", model_types=("llama", "mistral", "qwen2"), task="text", rules=RULES,
    model_in=model_in, task_in=task_in, config_out=config_out, build=build,
    shape="Llama-shaped (RoPE, RMSNorm, SwiGLU, no biases)",
    requires={"positions": ("rope",), "norm": ("rmsnorm",), "mlp": ("swiglu",),
              "bias": (False,)},
    claims=CLAIMS, ignored=("*rotary_emb.inv_freq", "lm_head.weight"))
