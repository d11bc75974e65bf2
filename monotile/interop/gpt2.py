"""GPT-2 (`gpt2`, GPT2LMHeadModel) as a text run: learned positions, pre-norm LayerNorm
blocks, GELU (tanh), biases everywhere, a head tied to the token embedding or not.

The names and layouts differ; the numbers do not:
- GPT-2 stores its projections as Conv1D, weight (in, out): ours are nn.Linear, (out, in).
- c_attn is already one fused projection (columns q | k | v), as our qkv's rows are.
- h.{i}.attn.bias and masked_bias are causal-mask buffers, not weights: dropped.
"""

from __future__ import annotations

from ..core.transformer import ModelConfig
from ..errors import ConfigError
from .adapter import (GELU, Adapter, Pair, affine, keys_in, keys_out, one, tie, value_in,
                      value_out)
from .causal_lm import CLAIMS, build, files_out, task_in

CONV1D = Pair(lambda w, dims: w.T, lambda w, dims: w.T)  # (in, out) <-> nn.Linear's (out, in)


def conv1d(ours: str, theirs: str, shape: tuple) -> list:
    """A Conv1D's weight, their (in, out), and its bias (out,)."""
    return [one(f"{ours}.weight", f"{theirs}.weight", shape, CONV1D),
            one(f"{ours}.bias", f"{theirs}.bias", shape[1:])]


B, H = "trunk.blocks.{i}.", "{p}h.{i}."
RULES = (
    one("tok_emb.weight", "{p}wte.weight", ("V", "d")),
    one("trunk.pos_emb", "{p}wpe.weight", ("ctx", "d")),
    *affine(B + "norm1", H + "ln_1", ("d",)),
    *affine(B + "norm2", H + "ln_2", ("d",)),
    *conv1d(B + "attn.qkv", H + "attn.c_attn", ("d", "3d")),
    *conv1d(B + "attn.wo", H + "attn.c_proj", ("d", "d")),
    *conv1d(B + "mlp.fc1", H + "mlp.c_fc", ("d", "ff")),
    *conv1d(B + "mlp.fc2", H + "mlp.c_proj", ("ff", "d")),
    *affine("trunk.norm", "{p}ln_f", ("d",)),
    one("head.weight", "lm_head.weight", ("V", "d"), when="untied", fallback="tok_emb.weight"),
    tie("head.weight", "tok_emb.weight", when="tied"),
)

# ours <-> config.json (ours, theirs[, default when absent])
KEYS = (("vocab_size", "vocab_size"), ("n_layer", "n_layer"), ("n_head", "n_head"),
        ("d_model", "n_embd"), ("context", "n_positions"),
        ("norm_eps", "layer_norm_epsilon", 1e-5), ("tie_embeddings", "tie_word_embeddings", True))
FIXED = {"norm": "layernorm", "positions": "learned", "bias": True}
UNSUPPORTED = (("scale_attn_by_inverse_layer_idx", False), ("reorder_and_upcast_attn", False),
               ("scale_attn_weights", True))


def model_in(config: dict) -> ModelConfig:
    for key, ok in UNSUPPORTED:
        if config.get(key, ok) != ok:
            raise ConfigError(f"GPT-2 setting {key}={config[key]} is not supported")
    mlp = value_in(GELU, "activation_function", config.get("activation_function", "gelu_new"),
                   "GPT-2 ")
    return ModelConfig(**keys_in(config, KEYS), **FIXED, mlp=mlp,
                       d_ff=config.get("n_inner") or 4 * config["n_embd"])


def config_out(cfg: ModelConfig, text_cfg, kept: dict) -> tuple[dict, dict]:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **keys_out(cfg, KEYS),
            "n_inner": cfg.hidden, "activation_function": value_out(GELU, cfg.mlp),
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}, files_out(text_cfg)


GPT2 = Adapter(
    name="GPT-2", model_types=("gpt2",), task="text", rules=RULES, model_in=model_in,
    task_in=task_in, config_out=config_out, build=build,
    shape="GPT-2-shaped (learned positions, LayerNorm, GELU, biases)",
    requires={"positions": ("learned",), "norm": ("layernorm",), "bias": (True,),
              "mlp": ("gelu", "gelu_tanh"), "grouped_query": (False,)},
    claims=CLAIMS, prefix="transformer.",
    ignored=("{p}h.*.attn.bias", "{p}h.*.attn.masked_bias", "lm_head.weight"))
