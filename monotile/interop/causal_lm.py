"""What the causal language models (GPT-2, the Llama family) share as runs: a text run over
the checkpoint's own tokenizer (tokenizer="hf"), with LanguageModel as its model, keeping what
chatting with it needs: the chat template, the special tokens the template names, and the ids
that end generation."""

from __future__ import annotations

from ..core.transformer import ModelConfig
from ..errors import CheckpointError
from ..modalities.text import LanguageModel, TextConfig

CLAIMS = {"model": ("causal_lm",)}  # the text runs a causal language model exports
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def task_in(ckpt, cfg: ModelConfig, tokenizer) -> TextConfig:
    settings = ckpt.json("tokenizer_config.json")
    tokens = {name: token_text(settings.get(name)) for name in SPECIAL_TOKENS}
    return TextConfig(tokenizer="hf", chat_template=chat_template(ckpt, settings),
                      eos_ids=eos_ids(ckpt), **tokens)


def chat_template(ckpt, settings: dict) -> str | None:
    """The checkpoint's chat template, as transformers loads it: chat_template.jinja, else
    tokenizer_config.json's "chat_template" (a string, or named templates: "default"), else
    chat_template.json's (a processor's)."""
    if "chat_template.jinja" in ckpt.files:
        return ckpt.files["chat_template.jinja"].read_text(encoding="utf-8")
    template = settings.get("chat_template") or ckpt.json("chat_template.json").get(
        "chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise CheckpointError(f"{ckpt.source}'s chat templates are named "
                                  f"{', '.join(map(str, named))}, none default; name the one "
                                  "to keep default in its tokenizer_config.json")
        template = named["default"]
    return template or None


def token_text(token) -> str | None:
    """A special token as tokenizer_config.json writes it: its text, or an AddedToken's dict."""
    return token.get("content") if isinstance(token, dict) else token


def eos_ids(ckpt) -> tuple[int, ...]:
    """The ids that end generation: generation_config.json's eos_token_id (an id or a list),
    else config.json's."""
    ids = ckpt.json("generation_config.json").get("eos_token_id")
    if ids is None:
        ids = ckpt.config.get("eos_token_id")
    if ids is None:
        return ()
    return tuple(ids) if isinstance(ids, (list, tuple)) else (ids,)


def files_out(text_cfg: TextConfig) -> dict[str, dict]:
    """What task_in reads, written back: tokenizer_config.json (the chat template and the
    special tokens' text) and generation_config.json (the ids that end generation), each only
    when the run has something to say in it."""
    files = {}
    tokens = text_cfg.template_tokens
    if text_cfg.chat_template or tokens:
        files["tokenizer_config.json"] = {
            "tokenizer_class": "PreTrainedTokenizerFast", **tokens,
            **({"chat_template": text_cfg.chat_template} if text_cfg.chat_template else {})}
    if text_cfg.eos_ids:
        ids = list(text_cfg.eos_ids)
        files["generation_config.json"] = {"eos_token_id": ids[0] if len(ids) == 1 else ids}
    return files


def build(cfg: ModelConfig, text_cfg: TextConfig) -> LanguageModel:
    return LanguageModel(cfg)
