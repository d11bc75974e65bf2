"""A checkpoint through an adapter into a run directory, and a run back out: the steps every
format and family share.

    reader (a Hugging Face folder, a GGUF file, a CTranslate2 folder) -> Checkpoint
    Checkpoint --adapter.model_in, task_in, tensors_in--> configs + weights -> run directory
    run --pick(adapters), tensors_out, config_out--> (config.json, other JSON files, tensors)

Every check runs before anything is written: the run directory is made last, once the
weights have loaded strictly into the model they belong to.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, ConfigError
from ..rundir import config_document, new_meta, new_run_dir, read_json, write_weights_run
from ..tokenizers import Tokenizer
from ..train.trainer import TrainConfig
from .adapter import Adapter, run_settings, tensors_in, tensors_out


@dataclass
class Checkpoint:
    """What a reader hands the adapters: the config as a dict, every tensor by its own name,
    the tokenizer.json (made by the reader when the format keeps it otherwise) and the other
    files by name."""

    source: Path
    config: dict
    tensors: dict[str, torch.Tensor]
    tokenizer: Path | None = None
    files: dict[str, Path] = field(default_factory=dict)
    no_tokenizer: str = "has no tokenizer.json"  # the reader's words for a missing tokenizer
    task: dict = field(default_factory=dict)      # task settings the format keeps beside the
                                                  #   weights (a GGUF's chat template, eos ids)
    imported: dict = field(default_factory=dict)  # more for config.json's "imported" record

    def json(self, name: str) -> dict:
        """One of the checkpoint's JSON files, {} when it has none."""
        return read_json(self.files[name]) if name in self.files else {}


def to_run(ckpt: Checkpoint, adapter: Adapter, out, dtype: torch.dtype = torch.float32) -> Path:
    """A monotile run directory of `adapter.task` from a checkpoint of its family, its weights
    stored in `dtype`."""
    out = new_run_dir(out, ckpt.source.name)  # refused now if it holds a run
    tokenizer = None
    if adapter.tokenizer is not None:
        if ckpt.tokenizer is None:
            raise CheckpointError(f"{ckpt.source} {ckpt.no_tokenizer}; save "
                                  f"{adapter.tokenizer} and import again")
        tokenizer = Tokenizer.load(ckpt.tokenizer)
    cfg = adapter.model_in(ckpt.config)
    task_cfg = adapter.task_in(ckpt, cfg, tokenizer)
    if ckpt.task:
        task_cfg = dataclasses.replace(task_cfg, **ckpt.task)
    if tokenizer is not None and tokenizer.vocab_size > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.vocab_size} tokens but the "
                              f"model only {cfg.vocab_size}; they do not belong together")
    weights = tensors_in(adapter, adapter.dims(cfg, task_cfg), ckpt.tensors)
    model = adapter.build(cfg, task_cfg)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the converted weights do not fit the model: {e}") from None
    model.to(dtype)
    doc = config_document(new_meta(adapter.task),
                          {"model": cfg, "train": TrainConfig(), adapter.task: task_cfg},
                          imported={"from": str(ckpt.source.resolve()),
                                    "model_type": ckpt.config["model_type"], **ckpt.imported})
    write_weights_run(out, doc, model, ckpt.tokenizer)
    for name in adapter.keep:
        if name in ckpt.files:
            shutil.copyfile(ckpt.files[name], out / name)
    return out


def pick(adapters, run) -> Adapter:
    """The adapter that exports `run`: of its task, claiming runs like it, the first whose
    requirements the run meets; else the refusal that says what does not fit."""
    task = run.meta["task"]
    mine = [a for a in adapters if a.task == task]
    if not mine:
        tasks = {a.task: [] for a in adapters}
        for a in adapters:
            tasks[a.task].append(a.name)
        kinds = [f"{t} ({', '.join(names)})" for t, names in tasks.items()]
        listed = ", ".join(kinds[:-1]) + " and " + kinds[-1] if len(kinds) > 1 else kinds[0]
        raise ConfigError(f"{run.dir} is a {task} run; export hf takes {listed} runs")
    settings = run_settings(run.configs)
    mine = [a for a in mine if not a.misfits(settings, a.claims)] or mine
    for a in mine:
        if not a.misfits(settings):
            return a
    if len(mine) == 1:
        raise ConfigError(f"{run.dir}'s model is not {mine[0].shape}: "
                          f"{', '.join(mine[0].misfits(settings))}; transformers' "
                          f"{mine[0].name} cannot hold it")
    raise ConfigError(f"{run.dir}'s model is neither {' nor '.join(a.shape for a in mine)}, "
                      "so no Hugging Face architecture holds it")


def from_run(run, adapters) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """(config.json, {name: other JSON file}, tensors) of a loaded run in the format of the
    adapter that fits it; every refusal comes before the caller writes anything."""
    adapter = pick(adapters, run)
    cfg, task_cfg = run.configs["model"], run.configs[adapter.task]
    sd = {k: v.detach().float() for k, v in run.model.state_dict().items()}
    tensors = tensors_out(adapter, adapter.dims(cfg, task_cfg), sd)
    kept = {name: read_json(run.dir / name) for name in adapter.keep
            if (run.dir / name).is_file()}
    config, files = adapter.config_out(cfg, task_cfg, kept)
    return config, files, tensors
