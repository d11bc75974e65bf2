"""Hugging Face checkpoints in and out: config.json + model.safetensors + tokenizer.json (or a
WordPiece vocab.txt).

    monotile import hf DIR --out RUN        monotile export hf RUN --out DIR

Supported, one adapter each (a table of names and layouts read both ways, interop/adapter.py):
GPT-2 (`gpt2`, interop/gpt2.py), the Llama family (`llama`, `mistral`, `qwen2`: RoPE with its
linear or llama3 scaling, grouped-query attention, SwiGLU, RMSNorm, tied or untied heads,
Qwen2's q/k/v biases; interop/llama.py), BERT-family encoders (`bert`, which MiniLM is: post-norm
blocks, absolute positions, token types; imported as a sentence-embedding run; interop/bert.py),
ViT image classifiers (`vit`, ViTForImageClassification: imported as a vision run, with its
labels and pixel statistics; interop/vit.py) and Whisper (`whisper`,
WhisperForConditionalGeneration: an encoder-decoder imported as a transcribe run;
interop/whisper.py). Import picks the adapter by config.json's model_type, export by the run's
task and settings (the first adapter that can hold it). Anything else, or a setting of these
that the trunk does not have, is refused by name before anything is written; a checkpoint is
never half-loaded. Only safetensors are read (interop/hf_folder.py).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from ..core.transformer import ModelConfig
from ..errors import ConfigError
from .adapter import Adapter, tensors_in
from .bert import BERT
from .convert import to_run
from .gpt2 import GPT2
from .hf_folder import export_run, read_hf_dir, tokenizer_file
from .llama import LLAMA
from .vit import VIT
from .whisper import WHISPER

ADAPTERS = (GPT2, LLAMA, BERT, VIT, WHISPER)  # export tries them in this order
BY_MODEL_TYPE = {kind: a for a in ADAPTERS for kind in a.model_types}
SUPPORTED = tuple(BY_MODEL_TYPE)

__all__ = ["ADAPTERS", "SUPPORTED", "adapter_for", "export_hf", "import_hf", "model_config",
           "read_hf_dir", "to_monotile", "tokenizer_file"]


def adapter_for(model_type) -> Adapter:
    """The adapter of a Hugging Face model_type, or a ConfigError naming what is supported."""
    if model_type not in BY_MODEL_TYPE:
        raise ConfigError(f"model_type {model_type!r} is not supported; import supports "
                          f"{', '.join(SUPPORTED)}")
    return BY_MODEL_TYPE[model_type]


def model_config(config: dict) -> ModelConfig:
    """Our trunk's settings for a Hugging Face config, refusing what the trunk cannot run."""
    return adapter_for(config.get("model_type")).model_in(config)


def to_monotile(kind: str, cfg: ModelConfig, tensors: dict,
                task_cfg=None) -> dict[str, torch.Tensor]:
    """Hugging Face tensor names and layouts -> monotile's state dict (of the model `kind`'s
    adapter builds; ViT and Whisper also need their task config for the sizes)."""
    adapter = adapter_for(kind)
    return tensors_in(adapter, adapter.dims(cfg, task_cfg), tensors)


def import_hf(src: str | Path, out: str | Path | None) -> Path:
    """A monotile run directory from a Hugging Face folder (see the module docstring)."""
    with tempfile.TemporaryDirectory() as tmp:  # a tokenizer.json made from vocab.txt
        ckpt = read_hf_dir(src, Path(tmp))
        return to_run(ckpt, adapter_for(ckpt.config.get("model_type")), out)


def export_hf(run_dir: str | Path, out: str | Path) -> Path:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer.json or the family's
    preprocessor_config.json) from a text run whose trunk is GPT-2-, Llama- or BERT-shaped, a
    ViT vision run or a Whisper transcribe run; transformers loads it with from_pretrained."""
    from ..run import load
    return export_run(load(run_dir, device="cpu"), out, ADAPTERS)
