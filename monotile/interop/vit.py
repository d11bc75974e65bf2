"""ViT image classifiers (`vit`, ViTForImageClassification) as vision runs, with their labels
(config.json's id2label) and pixel statistics (preprocessor_config.json): pre-norm LayerNorm
blocks, GELU, a CLS token, learned positions over the patches, a linear head.

The names and layouts differ; the numbers do not:
- ViT embeds patches with Conv2d(C, d, p, stride=p); ours is the same map as nn.Linear on
  patchify()'s flattened patches (channel-major), weight = conv.weight.flatten(1).
- attention.attention's query, key, value are one fused qkv here (rows q | k | v).
- The pixels are x / 255, then (x - mean) / std per channel, as ViTImageProcessor does.
"""

from __future__ import annotations

from ..core.transformer import ModelConfig
from ..errors import ConfigError
from ..modalities.vision import VisionConfig, VisionTask
from .adapter import (GELU, TRUNK_KEYS, Adapter, Pair, affine, keys_in, keys_out, one,
                      value_in, value_out)

PATCH = Pair(lambda w, dims: w.flatten(1),  # Conv2d (d, C, p, p) <-> Linear (d, C p p)
             lambda w, dims: w.reshape(dims["d"], dims["channels"], dims["patch"], dims["patch"]))
CLASSIFIER = "import takes an image classifier (ViTForImageClassification), not a bare ViTModel"

E, B, H = "vit.embeddings.", "trunk.blocks.{i}.", "vit.encoder.layer.{i}."
RULES = (
    *affine("head", "classifier", ("labels", "d"), note=CLASSIFIER),
    one("patch_emb.proj.weight", E + "patch_embeddings.projection.weight",
        ("d", "channels", "patch", "patch"), PATCH),
    one("patch_emb.proj.bias", E + "patch_embeddings.projection.bias", ("d",)),
    one("cls_token", E + "cls_token", (1, 1, "d")),
    one("pos_emb", E + "position_embeddings", (1, "ctx", "d")),
    *affine(B + "attn.qkv", [H + f"attention.attention.{x}" for x in ("query", "key", "value")],
            ("d", "d"), bias="qkv_bias"),
    *affine(B + "norm1", H + "layernorm_before", ("d",)),
    *affine(B + "attn.wo", H + "attention.output.dense", ("d", "d")),
    *affine(B + "norm2", H + "layernorm_after", ("d",)),
    *affine(B + "mlp.fc1", H + "intermediate.dense", ("ff", "d")),
    *affine(B + "mlp.fc2", H + "output.dense", ("d", "ff")),
    *affine("trunk.norm", "vit.layernorm", ("d",)),
)

KEYS = (*TRUNK_KEYS, ("norm_eps", "layer_norm_eps", 1e-12))
FIXED = {"vocab_size": 0, "norm": "layernorm", "positions": "none", "bias": True,
         "tie_embeddings": False}


def square(config: dict, key: str) -> int:
    value = config[key]
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConfigError(f"{key}={value} is not square; the vision model takes square "
                              "images and patches")
        value = value[0]
    return int(value)


def model_in(config: dict) -> ModelConfig:
    mlp = value_in(GELU, "hidden_act", config.get("hidden_act", "gelu"))
    size, patch = square(config, "image_size"), square(config, "patch_size")
    if size % patch:
        raise ConfigError(f"patch_size={patch} does not divide image_size={size}")
    return ModelConfig(**keys_in(config, KEYS), **FIXED, mlp=mlp,
                       context=(size // patch) ** 2 + 1,
                       qkv_bias=bool(config.get("qkv_bias", True)))


def task_in(ckpt, cfg: ModelConfig, tokenizer) -> VisionConfig:
    """Image size, channels and patches from config.json, class names from id2label, pixel
    mean and std from preprocessor_config.json."""
    config = ckpt.config
    channels = config.get("num_channels", 3)
    if channels not in (1, 3):
        raise ConfigError(f"num_channels={channels} is not supported (1 or 3)")
    n = len(config.get("id2label") or {})
    if n < 2:
        raise ConfigError("config.json names fewer than 2 classes (id2label); import takes an "
                          "image classifier (ViTForImageClassification)")
    labels = tuple(str(config["id2label"][str(i)]) for i in range(n))
    proc = ckpt.json("preprocessor_config.json")
    mean, std = proc.get("image_mean", [0.5] * 3), proc.get("image_std", [0.5] * 3)
    if not proc.get("do_normalize", True):
        mean, std = [0.0] * 3, [1.0] * 3
    if proc.get("do_rescale", True) is False or abs(proc.get("rescale_factor", 1 / 255)
                                                   - 1 / 255) > 1e-9:
        raise ConfigError("preprocessor_config.json rescales pixels other than by 1/255; "
                          "monotile reads 8-bit images and divides by 255")
    return VisionConfig(data="", image_size=square(config, "image_size"), channels=channels,
                        patch_size=square(config, "patch_size"), stem="patch", pool="cls",
                        labels=labels, mean=tuple(float(m) for m in mean[:channels]),
                        std=tuple(float(s) for s in std[:channels]))


def config_out(cfg: ModelConfig, vision: VisionConfig, kept: dict) -> tuple[dict, dict]:
    """config.json and preprocessor_config.json."""
    labels = list(vision.labels)
    config = {"model_type": "vit", "architectures": ["ViTForImageClassification"],
              **keys_out(cfg, KEYS), "hidden_act": value_out(GELU, cfg.mlp),
              "image_size": vision.image_size, "patch_size": vision.patch_size,
              "num_channels": vision.channels, "qkv_bias": cfg.qkv_bias is not False,
              "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
              "id2label": {str(i): name for i, name in enumerate(labels)},
              "label2id": {name: i for i, name in enumerate(labels)}}
    processor = {"image_processor_type": "ViTImageProcessor", "do_resize": True,
                 "size": {"height": vision.image_size, "width": vision.image_size},
                 "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": list(vision.mean),
                 "image_std": list(vision.std)}
    return config, {"preprocessor_config.json": processor}


VIT = Adapter(
    name="ViT", model_types=("vit",), task="vision", rules=RULES, model_in=model_in,
    task_in=task_in, config_out=config_out,
    build=lambda cfg, vision: VisionTask(vision).build_model(cfg),
    task_dims=lambda vision: {"channels": vision.channels, "patch": vision.patch_size,
                              "labels": len(vision.labels)},
    shape="ViT-shaped (a patch stem, a CLS token, pre-norm LayerNorm blocks with GELU and "
          "biases)",
    requires={"stem": ("patch",), "pool": ("cls",), "norm": ("layernorm",),
              "norm_position": ("pre",), "mlp": ("gelu", "gelu_tanh"), "bias": (True,)},
    unexpected="the ViT here does not, so it is not imported", tokenizer=None)
