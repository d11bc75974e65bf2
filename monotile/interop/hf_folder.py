"""A Hugging Face model folder, read and written: config.json, model.safetensors (or its
shards model-00001-of-0000N.safetensors), tokenizer.json (or a BERT-style vocab.txt) and
the other JSON files beside them (preprocessor_config.json, generation_config.json, ...), and
chat_template.jinja where transformers saved the chat template apart.

Only safetensors are read; a pickled pytorch_model.bin is refused with the command that
converts it (unpickling can run code). The folder becomes a Checkpoint (interop/convert.py)
that the adapters take; a reader for another format (GGUF, CTranslate2) would make the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..train.checkpoint import atomic_write_json, load_tensors, save_tensors
from .convert import Checkpoint, from_run


def read_hf_dir(src: str | Path, tmp: Path | None = None) -> Checkpoint:
    """config.json, every tensor of model.safetensors (or its shards) and the tokenizer, whose
    WordPiece vocab.txt becomes a tokenizer.json in `tmp`; refuses pickles."""
    src = Path(src)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json; give a Hugging Face model folder "
                              "(config.json, model.safetensors, tokenizer.json)")
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    weights = sorted(src.glob("model*.safetensors"))
    if not weights:
        if any(src.glob("pytorch_model*.bin")) or any(src.glob("*.pt")):
            raise CheckpointError(
                f"{src} holds only pickled weights (pytorch_model.bin), which monotile never "
                "loads (unpickling can run code); convert them once with transformers: "
                "AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR, "
                "safe_serialization=True)")
        raise CheckpointError(f"{src} has no model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    for f in weights:
        tensors.update(load_tensors(f)[0])
    return Checkpoint(src, config, tensors, tokenizer_file(src, tmp),
                      {f.name: f for f in [*src.glob("*.json"), *src.glob("chat_template.jinja")]},
                      "has no tokenizer.json (nor a WordPiece vocab.txt)")


def tokenizer_file(src: Path, tmp: Path | None) -> Path | None:
    """The folder's tokenizer.json; or, from a BERT-style vocab.txt alone, the WordPiece
    tokenizer transformers' BertTokenizerFast builds from it (BERT's normaliser with the
    tokenizer_config.json's lowercasing and accent stripping, [CLS] A [SEP]), saved in tmp;
    None when there is neither."""
    if (src / "tokenizer.json").is_file():
        return src / "tokenizer.json"
    if not (src / "vocab.txt").is_file() or tmp is None:
        return None
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


def export_run(run, out: str | Path, adapters) -> Path:
    """A folder transformers loads with from_pretrained, from a loaded run and the adapter of
    `adapters` that fits it: config.json, model.safetensors, the family's other JSON files
    and the run's tokenizer.json. Nothing is written unless every check passed."""
    out = Path(out)
    if (out / "config.json").exists():
        raise ConfigError(f"{out} already holds a model; choose another --out")
    config, files, tensors = from_run(run, adapters)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", {**config, "torch_dtype": "float32"})
    for name, doc in files.items():
        atomic_write_json(out / name, doc)
    save_tensors(out / "model.safetensors", tensors, {"format": "pt"})
    if (run.dir / "tokenizer.json").is_file():
        shutil.copyfile(run.dir / "tokenizer.json", out / "tokenizer.json")
    return out
