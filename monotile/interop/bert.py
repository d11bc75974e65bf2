"""BERT-family encoders (`bert`, which MiniLM is) as sentence-embedding text runs: post-norm
blocks, absolute positions, token types, a norm over the embeddings; BertModel's pooler rides
along for export. sentence-transformers' max_seq_length (sentence_bert_config.json) is kept as
the run's truncation.

The names and layouts differ; the numbers do not:
- attention.self's query, key, value are one fused qkv here (rows q | k | v).
- attention.output.LayerNorm is the first block norm (after attention, as BERT is post-norm),
  output.LayerNorm the second; embeddings.LayerNorm is the trunk's embed_norm.
- embeddings.position_ids and token_type_ids are index buffers: dropped.
"""

from __future__ import annotations

from ..core.transformer import ModelConfig
from ..errors import ConfigError
from ..modalities.embed import TextEncoder
from ..modalities.text import TextConfig
from .adapter import (GELU, TRUNK_KEYS, Adapter, affine, keys_in, keys_out, one,
                      value_in, value_out)

E, B, H = "{p}embeddings.", "trunk.blocks.{i}.", "{p}encoder.layer.{i}."
RULES = (
    one("tok_emb.weight", E + "word_embeddings.weight", ("V", "d")),
    one("trunk.pos_emb", E + "position_embeddings.weight", ("ctx", "d")),
    one("type_emb.weight", E + "token_type_embeddings.weight", optional=True),
    *affine("trunk.embed_norm", E + "LayerNorm", ("d",)),
    *affine(B + "attn.qkv", [H + f"attention.self.{x}" for x in ("query", "key", "value")],
            ("d", "d")),
    *affine(B + "attn.wo", H + "attention.output.dense", ("d", "d")),
    *affine(B + "norm1", H + "attention.output.LayerNorm", ("d",)),
    *affine(B + "mlp.fc1", H + "intermediate.dense", ("ff", "d")),
    *affine(B + "mlp.fc2", H + "output.dense", ("d", "ff")),
    *affine(B + "norm2", H + "output.LayerNorm", ("d",)),
    *affine("pooler", "{p}pooler.dense", ("d", "d"), optional=True),
)

KEYS = (("vocab_size", "vocab_size"), *TRUNK_KEYS, ("context", "max_position_embeddings"),
        ("norm_eps", "layer_norm_eps", 1e-12))
FIXED = {"norm": "layernorm", "positions": "learned", "bias": True, "tie_embeddings": False,
         "norm_position": "post", "embed_norm": True}


def model_in(config: dict) -> ModelConfig:
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ConfigError(f"position_embedding_type={config['position_embedding_type']!r} "
                          "is not supported (absolute only)")
    mlp = value_in(GELU, "hidden_act", config.get("hidden_act", "gelu"))
    return ModelConfig(**keys_in(config, KEYS), **FIXED, mlp=mlp)


def task_in(ckpt, cfg: ModelConfig, tokenizer) -> TextConfig:
    """An encoder run: token types and a pooler when the checkpoint has them, and
    sentence-transformers' own truncation."""
    types = [v for k, v in ckpt.tensors.items()
             if k.endswith("embeddings.token_type_embeddings.weight")]
    return TextConfig(tokenizer="hf", model="encoder", type_vocab=len(types[0]) if types else 0,
                      pooler=any(k.endswith("pooler.dense.weight") for k in ckpt.tensors),
                      max_tokens=ckpt.json("sentence_bert_config.json").get("max_seq_length"),
                      pad_id=ckpt.config.get("pad_token_id") or 0)


def config_out(cfg: ModelConfig, text_cfg: TextConfig, kept: dict) -> tuple[dict, dict]:
    return {"model_type": "bert", "architectures": ["BertModel"], **keys_out(cfg, KEYS),
            "hidden_act": value_out(GELU, cfg.mlp), "type_vocab_size": text_cfg.type_vocab or 2,
            "pad_token_id": text_cfg.pad_id, "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "position_embedding_type": "absolute",
            "add_pooling_layer": text_cfg.pooler}, {}


def build(cfg: ModelConfig, text_cfg: TextConfig) -> TextEncoder:
    return TextEncoder(cfg, text_cfg.type_vocab, text_cfg.pooler)


BERT = Adapter(
    name="BERT", model_types=("bert",), task="text", rules=RULES, model_in=model_in,
    task_in=task_in, config_out=config_out, build=build,
    shape="BERT-shaped (post-norm blocks, a norm over the embeddings, learned positions)",
    requires={"norm_position": ("post",), "embed_norm": (True,), "positions": ("learned",)},
    claims={"model": ("encoder",)}, prefix="bert.", writes_prefix=False,
    ignored=(E + "position_ids", E + "token_type_ids"),
    unexpected="the encoder does not (a task head?), so it is not imported; give the bare "
               "encoder (BertModel)")
