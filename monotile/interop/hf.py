"""Hugging Face checkpoints in and out: config.json + model.safetensors + tokenizer.json (or a
WordPiece vocab.txt).

    monotile import hf DIR --out RUN        monotile export hf RUN --out DIR

Supported: GPT-2 (`gpt2`), the Llama family (`llama`, `mistral`, `qwen2`: RoPE with its
linear or llama3 scaling, grouped-query attention, SwiGLU, RMSNorm, tied or untied heads, Qwen2's
q/k/v biases), BERT-family encoders (`bert`, which MiniLM is: post-norm blocks, absolute
positions, token types; imported as a sentence-embedding run) and ViT image classifiers (`vit`,
ViTForImageClassification: imported as a vision run, with its labels and pixel statistics from
config.json and preprocessor_config.json) and Whisper (`whisper`, WhisperForConditionalGeneration:
an encoder-decoder imported as a transcribe run; interop/whisper.py). Anything else, or a setting
of these that the trunk does not have, is refused by name before anything is written; a
checkpoint is never half-loaded.

The names and layouts differ; the numbers do not:
- GPT-2 stores its projections as Conv1D, weight (in, out): ours are nn.Linear, (out, in).
- ViT embeds patches with Conv2d(C, d, p, stride=p); ours is the same map as nn.Linear on
  patchify()'s flattened patches, weight = conv.weight.flatten(1).
- Llama's q_proj, k_proj, v_proj are one fused qkv here (rows q | k | v).
- Llama rotates the pairs (x_j, x_{j+d/2}) of each head ("rotate_half"); monotile rotates
  (x_2j, x_2j+1). The same rotation after permuting each head's rows of Wq and Wk:
  row 2j <- row j, row 2j+1 <- row j + d/2 (tests/test_attention.py checks the identity).
Only safetensors are read; a pickled pytorch_model.bin is refused with the command that
converts it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch

from .. import __version__
from ..core.transformer import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..modalities.text import LanguageModel, TextConfig
from ..train.checkpoint import atomic_write_json, load_tensors, save_tensors
from ..train.trainer import TrainConfig

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
SUPPORTED = ("gpt2",) + LLAMA_FAMILY + ("bert", "vit", "whisper")


# ---- reading a Hugging Face folder -------------------------------------------------------------

def read_hf_dir(src: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """config.json and every tensor of model.safetensors (or its shards); refuses pickles."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json; give a Hugging Face model folder "
                              "(config.json, model.safetensors, tokenizer.json)")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    files = sorted(src.glob("model*.safetensors"))
    if not files:
        if any(src.glob("pytorch_model*.bin")) or any(src.glob("*.pt")):
            raise CheckpointError(
                f"{src} holds only pickled weights (pytorch_model.bin), which monotile never "
                "loads (unpickling can run code); convert them once with transformers: "
                "AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR, "
                "safe_serialization=True)")
        raise CheckpointError(f"{src} has no model.safetensors")
    tensors = {}
    for f in files:
        tensors.update(load_tensors(f)[0])
    return config, tensors


def _rope(config: dict) -> tuple[float, dict | None]:
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
    keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
    return theta, {"rope_type": kind, **{k: scaling[k] for k in keep if k in scaling}}


def model_config(config: dict) -> ModelConfig:
    """Our trunk's settings for a Hugging Face config, refusing what the trunk cannot run."""
    kind = config.get("model_type")
    if kind not in SUPPORTED:
        raise ConfigError(f"model_type {kind!r} is not supported; import supports "
                          f"{', '.join(SUPPORTED)}")
    if kind == "gpt2":
        for key, ok in (("scale_attn_by_inverse_layer_idx", False),
                        ("reorder_and_upcast_attn", False), ("scale_attn_weights", True)):
            if config.get(key, ok) != ok:
                raise ConfigError(f"GPT-2 setting {key}={config[key]} is not supported")
        act = config.get("activation_function", "gelu_new")
        mlp = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if mlp is None:
            raise ConfigError(f"GPT-2 activation_function={act!r} is not supported")
        return ModelConfig(
            vocab_size=config["vocab_size"], n_layer=config["n_layer"],
            n_head=config["n_head"], d_model=config["n_embd"],
            d_ff=config.get("n_inner") or 4 * config["n_embd"], context=config["n_positions"],
            norm="layernorm", norm_eps=config.get("layer_norm_epsilon", 1e-5), mlp=mlp,
            positions="learned", bias=True, tie_embeddings=config.get("tie_word_embeddings",
                                                                      True))
    if kind == "vit":
        return _vit_config(config)
    if kind == "bert":
        if config.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"position_embedding_type={config['position_embedding_type']!r} "
                              "is not supported (absolute only)")
        act = config.get("hidden_act", "gelu")
        if act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"hidden_act={act!r} is not supported")
        return ModelConfig(
            vocab_size=config["vocab_size"], n_layer=config["num_hidden_layers"],
            n_head=config["num_attention_heads"], d_model=config["hidden_size"],
            d_ff=config["intermediate_size"], context=config["max_position_embeddings"],
            norm="layernorm", norm_eps=config.get("layer_norm_eps", 1e-12),
            mlp="gelu" if act == "gelu" else "gelu_tanh", positions="learned", bias=True,
            tie_embeddings=False, norm_position="post", embed_norm=True)
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
    theta, scaling = _rope(config)
    attention_bias = bool(config.get("attention_bias", kind == "qwen2"))
    return ModelConfig(
        vocab_size=config["vocab_size"], n_layer=config["num_hidden_layers"], n_head=heads,
        n_kv_head=config.get("num_key_value_heads", heads), d_model=d,
        d_ff=config["intermediate_size"], context=config["max_position_embeddings"],
        norm="rmsnorm", norm_eps=config.get("rms_norm_eps", 1e-6), mlp="swiglu",
        positions="rope", rope_theta=theta, rope_scaling=scaling, bias=False,
        qkv_bias=attention_bias if kind == "qwen2" else None,
        tie_embeddings=config.get("tie_word_embeddings", False))


def _square(config: dict, key: str) -> int:
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{key}={value} is not square; the vision model takes square "
                              "images and patches")
        value = value[0]
    return int(value)


def _vit_config(config: dict) -> ModelConfig:
    act = config.get("hidden_act", "gelu")
    mlp = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(act)
    if mlp is None:
        raise ConfigError(f"hidden_act={act!r} is not supported")
    size, patch = _square(config, "image_size"), _square(config, "patch_size")
    if size % patch:
        raise ConfigError(f"patch_size={patch} does not divide image_size={size}")
    return ModelConfig(
        vocab_size=0, n_layer=config["num_hidden_layers"], n_head=config["num_attention_heads"],
        d_model=config["hidden_size"], d_ff=config["intermediate_size"],
        context=(size // patch) ** 2 + 1, norm="layernorm",
        norm_eps=config.get("layer_norm_eps", 1e-12), mlp=mlp, positions="none", bias=True,
        qkv_bias=bool(config.get("qkv_bias", True)), tie_embeddings=False)


def _vision_config(config: dict, src: Path):
    """Our VisionConfig for a ViT: image size, channels and patches from config.json, class
    names from id2label, pixel mean and std from preprocessor_config.json (x / 255 - mean) / std,
    as transformers' ViTImageProcessor normalises."""
    from ..modalities.vision import VisionConfig
    channels = config.get("num_channels", 3)
    if channels not in (1, 3):
        raise ConfigError(f"num_channels={channels} is not supported (1 or 3)")
    n = len(config.get("id2label") or {})
    if n < 2:
        raise ConfigError("config.json names fewer than 2 classes (id2label); import takes an "
                          "image classifier (ViTForImageClassification)")
    labels = tuple(str(config["id2label"][str(i)]) for i in range(n))
    pre = src / "preprocessor_config.json"
    proc = json.loads(pre.read_text(encoding="utf-8")) if pre.is_file() else {}
    mean, std = proc.get("image_mean", [0.5] * 3), proc.get("image_std", [0.5] * 3)
    if not proc.get("do_normalize", True):
        mean, std = [0.0] * 3, [1.0] * 3
    if proc.get("do_rescale", True) is False or abs(proc.get("rescale_factor", 1 / 255)
                                                   - 1 / 255) > 1e-9:
        raise ConfigError("preprocessor_config.json rescales pixels other than by 1/255; "
                          "monotile reads 8-bit images and divides by 255")
    mean, std = [float(m) for m in mean][:channels], [float(x) for x in std][:channels]
    return VisionConfig(data="", image_size=_square(config, "image_size"), channels=channels,
                        patch_size=_square(config, "patch_size"), stem="patch", pool="cls",
                        labels=labels, mean=tuple(mean), std=tuple(std))


# ---- the rotate-half permutation ---------------------------------------------------------------

def _half_to_pairs(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows of each head reordered from (x_j, x_{j+d/2}) pairs to (x_2j, x_2j+1) pairs."""
    hd = w.size(0) // heads
    order = torch.stack([torch.arange(hd // 2), torch.arange(hd // 2) + hd // 2], 1).flatten()
    return w.reshape(heads, hd, *w.shape[1:])[:, order].reshape(w.shape)


def _pairs_to_half(w: torch.Tensor, heads: int) -> torch.Tensor:
    hd = w.size(0) // heads
    order = torch.cat([torch.arange(0, hd, 2), torch.arange(1, hd, 2)])
    return w.reshape(heads, hd, *w.shape[1:])[:, order].reshape(w.shape)


# ---- weights in --------------------------------------------------------------------------------

def _take(tensors: dict, name: str, shape=None) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint")
    t = tensors.pop(name).float()
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)}, the config implies "
                              f"{tuple(shape)}")
    return t


def to_monotile(kind: str, cfg: ModelConfig, tensors: dict) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names and layouts -> monotile's (LanguageModel state dict)."""
    t = dict(tensors)
    out = {}
    d, L, V, hd = cfg.d_model, cfg.n_layer, cfg.vocab_size, cfg.head_dim
    if kind == "bert":
        return _bert_in(cfg, t)
    if kind == "vit":
        return _vit_in(cfg, t)
    if kind == "gpt2":
        p = "transformer." if any(k.startswith("transformer.") for k in t) else ""
        out["tok_emb.weight"] = _take(t, f"{p}wte.weight", (V, d))
        out["trunk.pos_emb"] = _take(t, f"{p}wpe.weight", (cfg.context, d))
        for i in range(L):
            h, b = f"{p}h.{i}.", f"trunk.blocks.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
                out[b + f"{ours}.weight"] = _take(t, h + f"{theirs}.weight", (d,))
                out[b + f"{ours}.bias"] = _take(t, h + f"{theirs}.bias", (d,))
            for ours, theirs, shape in (("attn.qkv", "attn.c_attn", (d, 3 * d)),
                                        ("attn.wo", "attn.c_proj", (d, d)),
                                        ("mlp.fc1", "mlp.c_fc", (d, cfg.hidden)),
                                        ("mlp.fc2", "mlp.c_proj", (cfg.hidden, d))):
                out[b + f"{ours}.weight"] = _take(t, h + f"{theirs}.weight", shape).T
                out[b + f"{ours}.bias"] = _take(t, h + f"{theirs}.bias", (shape[1],))
            t.pop(h + "attn.bias", None), t.pop(h + "attn.masked_bias", None)  # causal buffers
        out["trunk.norm.weight"] = _take(t, f"{p}ln_f.weight", (d,))
        out["trunk.norm.bias"] = _take(t, f"{p}ln_f.bias", (d,))
        head = t.pop("lm_head.weight", None)
        if not cfg.tie_embeddings:
            out["head.weight"] = head if head is not None else out["tok_emb.weight"]
    else:
        H, Hkv = cfg.n_head, cfg.kv_heads
        out["tok_emb.weight"] = _take(t, "model.embed_tokens.weight", (V, d))
        for i in range(L):
            h, b = f"model.layers.{i}.", f"trunk.blocks.{i}."
            out[b + "norm1.weight"] = _take(t, h + "input_layernorm.weight", (d,))
            out[b + "norm2.weight"] = _take(t, h + "post_attention_layernorm.weight", (d,))
            q = _half_to_pairs(_take(t, h + "self_attn.q_proj.weight", (H * hd, d)), H)
            k = _half_to_pairs(_take(t, h + "self_attn.k_proj.weight", (Hkv * hd, d)), Hkv)
            v = _take(t, h + "self_attn.v_proj.weight", (Hkv * hd, d))
            out[b + "attn.qkv.weight"] = torch.cat([q, k, v])
            if cfg.qkv_bias:
                qb = _half_to_pairs(_take(t, h + "self_attn.q_proj.bias", (H * hd,)), H)
                kb = _half_to_pairs(_take(t, h + "self_attn.k_proj.bias", (Hkv * hd,)), Hkv)
                vb = _take(t, h + "self_attn.v_proj.bias", (Hkv * hd,))
                out[b + "attn.qkv.bias"] = torch.cat([qb, kb, vb])
            out[b + "attn.wo.weight"] = _take(t, h + "self_attn.o_proj.weight", (d, H * hd))
            gate = _take(t, h + "mlp.gate_proj.weight", (cfg.hidden, d))
            up = _take(t, h + "mlp.up_proj.weight", (cfg.hidden, d))
            out[b + "mlp.gate_up.weight"] = torch.cat([gate, up])
            out[b + "mlp.down.weight"] = _take(t, h + "mlp.down_proj.weight", (d, cfg.hidden))
        out["trunk.norm.weight"] = _take(t, "model.norm.weight", (d,))
        head = t.pop("lm_head.weight", None)
        if not cfg.tie_embeddings:
            if head is None:
                raise CheckpointError("tensor 'lm_head.weight' is missing from the checkpoint")
            out["head.weight"] = head.float()
        for name in [k for k in t if k.endswith("rotary_emb.inv_freq")]:
            t.pop(name)  # recomputed from the config
    if t:
        raise CheckpointError(f"unexpected tensor {sorted(t)[0]!r} in the checkpoint; this "
                              "model has parts the trunk does not, so it is not imported")
    return out


BERT_LAYER = (("attn.wo", "attention.output.dense"), ("norm1", "attention.output.LayerNorm"),
              ("mlp.fc1", "intermediate.dense"), ("mlp.fc2", "output.dense"),
              ("norm2", "output.LayerNorm"))


def _bert_in(cfg: ModelConfig, t: dict) -> dict[str, torch.Tensor]:
    p = "bert." if any(k.startswith("bert.") for k in t) else ""
    d, out = cfg.d_model, {}
    e = f"{p}embeddings."
    out["tok_emb.weight"] = _take(t, e + "word_embeddings.weight", (cfg.vocab_size, d))
    out["trunk.pos_emb"] = _take(t, e + "position_embeddings.weight", (cfg.context, d))
    if e + "token_type_embeddings.weight" in t:
        out["type_emb.weight"] = _take(t, e + "token_type_embeddings.weight")
    out["trunk.embed_norm.weight"] = _take(t, e + "LayerNorm.weight", (d,))
    out["trunk.embed_norm.bias"] = _take(t, e + "LayerNorm.bias", (d,))
    t.pop(e + "position_ids", None), t.pop(e + "token_type_ids", None)  # index buffers
    for i in range(cfg.n_layer):
        h, b = f"{p}encoder.layer.{i}.", f"trunk.blocks.{i}."
        for part in ("weight", "bias"):
            out[b + f"attn.qkv.{part}"] = torch.cat(
                [_take(t, h + f"attention.self.{x}.{part}") for x in ("query", "key", "value")])
            for ours, theirs in BERT_LAYER:
                out[b + f"{ours}.{part}"] = _take(t, h + f"{theirs}.{part}")
    if f"{p}pooler.dense.weight" in t:
        out["pooler.weight"] = _take(t, f"{p}pooler.dense.weight", (d, d))
        out["pooler.bias"] = _take(t, f"{p}pooler.dense.bias", (d,))
    if t:
        raise CheckpointError(f"unexpected tensor {sorted(t)[0]!r} in the checkpoint; this "
                              "model has parts the encoder does not (a task head?), so it is "
                              "not imported; give the bare encoder (BertModel)")
    return out


VIT_LAYER = (("norm1", "layernorm_before"), ("attn.wo", "attention.output.dense"),
             ("norm2", "layernorm_after"), ("mlp.fc1", "intermediate.dense"),
             ("mlp.fc2", "output.dense"))


def _vit_in(cfg: ModelConfig, t: dict) -> dict[str, torch.Tensor]:
    if "classifier.weight" not in t:
        raise CheckpointError("tensor 'classifier.weight' is missing from the checkpoint; "
                              "import takes an image classifier (ViTForImageClassification), "
                              "not a bare ViTModel")
    d, out, e = cfg.d_model, {}, "vit.embeddings."
    conv = _take(t, e + "patch_embeddings.projection.weight")
    if conv.dim() != 4 or conv.size(0) != d or conv.size(2) != conv.size(3):
        raise CheckpointError(f"tensor '{e}patch_embeddings.projection.weight' has shape "
                              f"{tuple(conv.shape)}, the config implies ({d}, C, p, p)")
    out["patch_emb.proj.weight"] = conv.flatten(1)  # patchify's channel-major patches
    out["patch_emb.proj.bias"] = _take(t, e + "patch_embeddings.projection.bias", (d,))
    out["cls_token"] = _take(t, e + "cls_token", (1, 1, d))
    out["pos_emb"] = _take(t, e + "position_embeddings", (1, cfg.context, d))
    qkv = ("bias", "weight") if cfg.qkv_bias else ("weight",)
    for i in range(cfg.n_layer):
        h, b = f"vit.encoder.layer.{i}.", f"trunk.blocks.{i}."
        for part in qkv:
            shape = (d, d) if part == "weight" else (d,)
            out[b + f"attn.qkv.{part}"] = torch.cat(
                [_take(t, h + f"attention.attention.{x}.{part}", shape)
                 for x in ("query", "key", "value")])
        for part in ("weight", "bias"):
            for ours, theirs in VIT_LAYER:
                out[b + f"{ours}.{part}"] = _take(t, h + f"{theirs}.{part}")
    out["trunk.norm.weight"] = _take(t, "vit.layernorm.weight", (d,))
    out["trunk.norm.bias"] = _take(t, "vit.layernorm.bias", (d,))
    out["head.weight"] = _take(t, "classifier.weight")
    out["head.bias"] = _take(t, "classifier.bias", (out["head.weight"].size(0),))
    if t:
        raise CheckpointError(f"unexpected tensor {sorted(t)[0]!r} in the checkpoint; this "
                              "model has parts the ViT here does not, so it is not imported")
    return out


def _vit_out(cfg: ModelConfig, sd: dict, channels: int, patch: int) -> dict[str, torch.Tensor]:
    d, e = cfg.d_model, "vit.embeddings."
    out = {e + "patch_embeddings.projection.weight":
           sd["patch_emb.proj.weight"].reshape(d, channels, patch, patch),
           e + "patch_embeddings.projection.bias": sd["patch_emb.proj.bias"],
           e + "cls_token": sd["cls_token"], e + "position_embeddings": sd["pos_emb"]}
    for i in range(cfg.n_layer):
        h, b = f"vit.encoder.layer.{i}.", f"trunk.blocks.{i}."
        for part in ("weight", "bias"):
            if b + f"attn.qkv.{part}" in sd:
                for x, chunk in zip(("query", "key", "value"), sd[b + f"attn.qkv.{part}"].split(d)):
                    out[h + f"attention.attention.{x}.{part}"] = chunk
            for ours, theirs in VIT_LAYER:
                out[h + f"{theirs}.{part}"] = sd[b + f"{ours}.{part}"]
    out["vit.layernorm.weight"], out["vit.layernorm.bias"] = sd["trunk.norm.weight"], \
        sd["trunk.norm.bias"]
    out["classifier.weight"], out["classifier.bias"] = sd["head.weight"], sd["head.bias"]
    return out


def _bert_out(cfg: ModelConfig, sd: dict) -> dict[str, torch.Tensor]:
    d, out = cfg.d_model, {}
    out["embeddings.word_embeddings.weight"] = sd["tok_emb.weight"]
    out["embeddings.position_embeddings.weight"] = sd["trunk.pos_emb"]
    if "type_emb.weight" in sd:
        out["embeddings.token_type_embeddings.weight"] = sd["type_emb.weight"]
    out["embeddings.LayerNorm.weight"] = sd["trunk.embed_norm.weight"]
    out["embeddings.LayerNorm.bias"] = sd["trunk.embed_norm.bias"]
    for i in range(cfg.n_layer):
        h, b = f"encoder.layer.{i}.", f"trunk.blocks.{i}."
        for part in ("weight", "bias"):
            for x, chunk in zip(("query", "key", "value"), sd[b + f"attn.qkv.{part}"].split(d)):
                out[h + f"attention.self.{x}.{part}"] = chunk.contiguous()
            for ours, theirs in BERT_LAYER:
                out[h + f"{theirs}.{part}"] = sd[b + f"{ours}.{part}"]
    if "pooler.weight" in sd:
        out["pooler.dense.weight"] = sd["pooler.weight"]
        out["pooler.dense.bias"] = sd["pooler.bias"]
    return out


def import_hf(src: str | Path, out: str | Path) -> Path:
    """A monotile run directory from a Hugging Face folder (see the module docstring)."""
    from ..run import _config_json, _new_run_dir, write_weights_run
    from ..tokenizers import Tokenizer
    src = Path(src)
    config, tensors = read_hf_dir(src)
    if config.get("model_type") == "whisper":
        from .whisper import import_whisper
        return import_whisper(src, config, tensors, out)
    cfg = model_config(config)
    if config["model_type"] == "vit":
        return _import_vit(src, config, cfg, tensors, out)
    weights = to_monotile(config["model_type"], cfg, tensors)
    encoder = config["model_type"] == "bert"
    text_cfg = TextConfig(tokenizer="hf")
    if encoder:
        from ..modalities.embed import TextEncoder
        st = src / "sentence_bert_config.json"  # sentence-transformers' own truncation
        max_tokens = json.loads(st.read_text())["max_seq_length"] if st.is_file() else None
        text_cfg = TextConfig(tokenizer="hf", model="encoder",
                              type_vocab=len(weights.get("type_emb.weight", [])),
                              pooler="pooler.weight" in weights, max_tokens=max_tokens,
                              pad_id=config.get("pad_token_id") or 0)
        model = TextEncoder(cfg, text_cfg.type_vocab, text_cfg.pooler)
    else:
        if cfg.tie_embeddings:
            weights["head.weight"] = weights["tok_emb.weight"]
        model = LanguageModel(cfg)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the converted weights do not fit the model: {e}") from None
    out = _new_run_dir(out, src.name)  # refused now if it holds a run
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = tokenizer_file(src, Path(tmp))
        tokenizer = Tokenizer.load(tok_path)
        if tokenizer.vocab_size > cfg.vocab_size:
            raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                                  f"model only {cfg.vocab_size}; they do not belong together")
        meta = {"monotile_version": __version__, "task": "text", "preset": None}
        doc = {**_config_json(meta, {"model": cfg, "train": TrainConfig(), "text": text_cfg}),
               "imported": {"from": str(src.resolve()), "model_type": config["model_type"]}}
        return write_weights_run(out, doc, model, tok_path)


def tokenizer_file(src: Path, tmp: Path) -> Path:
    """The folder's tokenizer.json; or, from a BERT-style vocab.txt alone, the WordPiece
    tokenizer transformers' BertTokenizerFast builds from it (BERT's normaliser with the
    tokenizer_config.json's lowercasing and accent stripping, [CLS] A [SEP]), saved in tmp."""
    if (src / "tokenizer.json").is_file():
        return src / "tokenizer.json"
    if not (src / "vocab.txt").is_file():
        raise CheckpointError(f"{src} has no tokenizer.json (nor a WordPiece vocab.txt); save "
                              "the tokenizer beside the weights (tokenizer.save_pretrained(DIR)) "
                              "and import again")
    from tokenizers import BertWordPieceTokenizer
    settings = src / "tokenizer_config.json"
    settings = json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else {}
    tok = BertWordPieceTokenizer(
        str(src / "vocab.txt"), lowercase=settings.get("do_lower_case", True),
        strip_accents=settings.get("strip_accents"),
        handle_chinese_chars=settings.get("tokenize_chinese_chars", True),
        unk_token=settings.get("unk_token", "[UNK]"), sep_token=settings.get("sep_token", "[SEP]"),
        cls_token=settings.get("cls_token", "[CLS]"), pad_token=settings.get("pad_token", "[PAD]"),
        mask_token=settings.get("mask_token", "[MASK]"))
    tok.save(str(tmp / "tokenizer.json"))
    return tmp / "tokenizer.json"


def _import_vit(src: Path, config: dict, cfg: ModelConfig, tensors: dict, out) -> Path:
    from ..modalities.vision import VisionTask
    from ..run import _config_json, _new_run_dir, write_weights_run
    out = _new_run_dir(out, src.name)  # refused now if it holds a run
    vision = _vision_config(config, src)
    weights = to_monotile("vit", cfg, tensors)
    if weights["head.weight"].shape != (len(vision.labels), cfg.d_model):
        raise CheckpointError(f"tensor 'classifier.weight' has shape "
                              f"{tuple(weights['head.weight'].shape)}, the config implies "
                              f"{(len(vision.labels), cfg.d_model)} ({len(vision.labels)} "
                              "labels in id2label)")
    model = VisionTask(vision).build_model(cfg)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the converted weights do not fit the model: {e}") from None
    meta = {"monotile_version": __version__, "task": "vision", "preset": None}
    doc = {**_config_json(meta, {"model": cfg, "train": TrainConfig(), "vision": vision}),
           "imported": {"from": str(src.resolve()), "model_type": "vit"}}
    return write_weights_run(out, doc, model)


def _export_vit(run, out: Path) -> Path:
    """A ViTForImageClassification folder with its preprocessor_config.json."""
    cfg, vision = run.configs["model"], run.configs["vision"]
    shaped = (vision.stem == "patch" and vision.pool == "cls" and cfg.norm == "layernorm"
              and cfg.norm_position == "pre" and cfg.mlp in ("gelu", "gelu_tanh") and cfg.bias)
    if not shaped:
        raise ConfigError(f"{run.dir}'s model is not ViT-shaped (a patch stem, a CLS token, "
                          "pre-norm LayerNorm blocks with GELU and biases): stem="
                          f"{vision.stem}, pool={vision.pool}, norm={cfg.norm}, mlp={cfg.mlp}; "
                          "transformers' ViT cannot hold it")
    sd = {k: v.detach().float() for k, v in run.model.state_dict().items()}
    labels = list(vision.labels)
    hf_config = {"model_type": "vit", "architectures": ["ViTForImageClassification"],
                 "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
                 "num_attention_heads": cfg.n_head, "intermediate_size": cfg.hidden,
                 "hidden_act": "gelu" if cfg.mlp == "gelu" else "gelu_new",
                 "layer_norm_eps": cfg.norm_eps, "image_size": vision.image_size,
                 "patch_size": vision.patch_size, "num_channels": vision.channels,
                 "qkv_bias": cfg.qkv_bias is not False, "hidden_dropout_prob": 0.0,
                 "attention_probs_dropout_prob": 0.0,
                 "id2label": {str(i): name for i, name in enumerate(labels)},
                 "label2id": {name: i for i, name in enumerate(labels)}}
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                 "size": {"height": vision.image_size, "width": vision.image_size},
                 "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": list(vision.mean),
                 "image_std": list(vision.std)}
    tensors = _vit_out(cfg, sd, vision.channels, vision.patch_size)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**hf_config, "torch_dtype": "float32"})
    atomic_write_json(out / "preprocessor_config.json", processor)
    save_tensors(out / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()},
                 {"format": "pt"})
    return out


# ---- weights out -------------------------------------------------------------------------------

def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer.json) from a text run
    whose trunk is GPT-2-, Llama- or BERT-shaped, a ViT vision run (with
    preprocessor_config.json instead of a tokenizer) or a Whisper transcribe run;
    transformers loads it with from_pretrained."""
    from ..run import load
    run = load(run_dir, device="cpu")
    out = Path(out)
    if (out / "config.json").exists():
        raise ConfigError(f"{out} already holds a model; choose another --out")
    if run.meta["task"] == "vision":
        return _export_vit(run, out)
    if run.meta["task"] == "transcribe":
        from .whisper import export_whisper
        return export_whisper(run, out)
    if run.meta["task"] != "text":
        raise ConfigError(f"{run.dir} is a {run.meta['task']} run; export hf takes text, "
                          "vision and transcribe (Whisper) runs")
    cfg = run.configs["model"]
    sd = {k: v.detach().float() for k, v in run.model.state_dict().items()}
    d, L, H, Hkv = cfg.d_model, cfg.n_layer, cfg.n_head, cfg.kv_heads
    hd = cfg.head_dim
    gpt2 = (cfg.positions == "learned" and cfg.norm == "layernorm" and cfg.bias
            and cfg.mlp in ("gelu", "gelu_tanh") and cfg.n_kv_head in (None, cfg.n_head))
    llama = (cfg.positions == "rope" and cfg.norm == "rmsnorm" and cfg.mlp == "swiglu"
             and not cfg.bias)
    tensors = {}
    text_cfg = run.configs["text"]
    if text_cfg.model == "encoder":
        if not (cfg.norm_position == "post" and cfg.embed_norm and cfg.positions == "learned"):
            raise ConfigError(f"{run.dir}'s encoder is not BERT-shaped; it cannot be exported")
        hf_config = {"model_type": "bert", "architectures": ["BertModel"],
                     "vocab_size": cfg.vocab_size, "hidden_size": d, "num_hidden_layers": L,
                     "num_attention_heads": H, "intermediate_size": cfg.hidden,
                     "hidden_act": "gelu" if cfg.mlp == "gelu" else "gelu_new",
                     "max_position_embeddings": cfg.context,
                     "type_vocab_size": text_cfg.type_vocab or 2,
                     "layer_norm_eps": cfg.norm_eps, "pad_token_id": text_cfg.pad_id,
                     "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
                     "position_embedding_type": "absolute", "add_pooling_layer":
                     text_cfg.pooler}
        tensors = _bert_out(cfg, sd)
    elif gpt2:
        hf_config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"],
                     "vocab_size": cfg.vocab_size, "n_positions": cfg.context, "n_embd": d,
                     "n_layer": L, "n_head": H, "n_inner": cfg.hidden,
                     "activation_function": "gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                     "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                     "attn_pdrop": 0.0, "tie_word_embeddings": cfg.tie_embeddings}
        tensors["transformer.wte.weight"] = sd["tok_emb.weight"]
        tensors["transformer.wpe.weight"] = sd["trunk.pos_emb"]
        for i in range(L):
            h, b = f"transformer.h.{i}.", f"trunk.blocks.{i}."
            for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2"), ):
                tensors[h + f"{theirs}.weight"] = sd[b + f"{ours}.weight"]
                tensors[h + f"{theirs}.bias"] = sd[b + f"{ours}.bias"]
            for ours, theirs in (("attn.qkv", "attn.c_attn"), ("attn.wo", "attn.c_proj"),
                                 ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                tensors[h + f"{theirs}.weight"] = sd[b + f"{ours}.weight"].T.contiguous()
                tensors[h + f"{theirs}.bias"] = sd[b + f"{ours}.bias"]
        tensors["transformer.ln_f.weight"] = sd["trunk.norm.weight"]
        tensors["transformer.ln_f.bias"] = sd["trunk.norm.bias"]
    elif llama:
        qkv_bias = bool(cfg.qkv_bias)
        hf_config = {"model_type": "qwen2" if qkv_bias else "llama",
                     "architectures": ["Qwen2ForCausalLM" if qkv_bias else "LlamaForCausalLM"],
                     "vocab_size": cfg.vocab_size, "hidden_size": d,
                     "intermediate_size": cfg.hidden, "num_hidden_layers": L,
                     "num_attention_heads": H, "num_key_value_heads": Hkv, "head_dim": hd,
                     "max_position_embeddings": cfg.context, "rms_norm_eps": cfg.norm_eps,
                     "hidden_act": "silu", "rope_theta": cfg.rope_theta,
                     "rope_scaling": cfg.rope_scaling, "attention_bias": qkv_bias,
                     "tie_word_embeddings": cfg.tie_embeddings}
        tensors["model.embed_tokens.weight"] = sd["tok_emb.weight"]
        for i in range(L):
            h, b = f"model.layers.{i}.", f"trunk.blocks.{i}."
            tensors[h + "input_layernorm.weight"] = sd[b + "norm1.weight"]
            tensors[h + "post_attention_layernorm.weight"] = sd[b + "norm2.weight"]
            q, k, v = sd[b + "attn.qkv.weight"].split([H * hd, Hkv * hd, Hkv * hd])
            tensors[h + "self_attn.q_proj.weight"] = _pairs_to_half(q, H)
            tensors[h + "self_attn.k_proj.weight"] = _pairs_to_half(k, Hkv)
            tensors[h + "self_attn.v_proj.weight"] = v.contiguous()
            if qkv_bias:
                qb, kb, vb = sd[b + "attn.qkv.bias"].split([H * hd, Hkv * hd, Hkv * hd])
                tensors[h + "self_attn.q_proj.bias"] = _pairs_to_half(qb, H)
                tensors[h + "self_attn.k_proj.bias"] = _pairs_to_half(kb, Hkv)
                tensors[h + "self_attn.v_proj.bias"] = vb.contiguous()
            tensors[h + "self_attn.o_proj.weight"] = sd[b + "attn.wo.weight"]
            gate, up = sd[b + "mlp.gate_up.weight"].split(cfg.hidden)
            tensors[h + "mlp.gate_proj.weight"] = gate.contiguous()
            tensors[h + "mlp.up_proj.weight"] = up.contiguous()
            tensors[h + "mlp.down_proj.weight"] = sd[b + "mlp.down.weight"]
        tensors["model.norm.weight"] = sd["trunk.norm.weight"]
    else:
        raise ConfigError(f"{run.dir}'s trunk is neither GPT-2-shaped (learned positions, "
                          "LayerNorm, GELU, biases) nor Llama-shaped (RoPE, RMSNorm, SwiGLU, no "
                          "biases), so no Hugging Face architecture holds it")
    if not cfg.tie_embeddings and text_cfg.model != "encoder":
        tensors["lm_head.weight"] = sd["head.weight"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**hf_config, "torch_dtype": "float32"})
    save_tensors(out / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()},
                 {"format": "pt"})
    if (run.dir / "tokenizer.json").exists():
        shutil.copyfile(run.dir / "tokenizer.json", out / "tokenizer.json")
    return out
