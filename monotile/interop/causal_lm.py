"""What the causal language models (GPT-2, the Llama family) share as runs: a text run over
the checkpoint's own tokenizer (tokenizer="hf"), with LanguageModel as its model."""

from __future__ import annotations

from ..core.transformer import ModelConfig
from ..modalities.text import LanguageModel, TextConfig

CLAIMS = {"model": ("causal_lm",)}  # the text runs a causal language model exports


def task_in(ckpt, cfg: ModelConfig, tokenizer) -> TextConfig:
    return TextConfig(tokenizer="hf")


def build(cfg: ModelConfig, text_cfg: TextConfig) -> LanguageModel:
    return LanguageModel(cfg)
