"""Runs made from runs: LoRA fine-tuning and folding adapters back in (`monotile finetune`,
`merge`), and int8 copies for inference (`monotile quantize`).

A fine-tuning run is a run directory like any other (`resume`, `eval`, `generate`, `predict`
work on it). Its config.json names its base run (path, checkpoint file and the SHA-256 of that
file) and its adapter (rank, alpha, targets); its checkpoints hold the adapters alone:

    runs/<base>-lora/config.json  adapter.safetensors  model.safetensors  best.safetensors
                     optimizer.safetensors  trainer_state.json  metrics.jsonl  tokenizer.json

`adapter.safetensors` is the adapter on its own, with the base's SHA-256 in its metadata, so
`monotile merge BASE ADAPTER --out RUN2` can refuse an adapter trained on another model.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from .core.lora import add_lora, merge_lora
from .core.transformer import ModelConfig, count_parameters, weights_left_uninitialised
from .data import find_data, sha256
from .errors import CheckpointError, ConfigError
from .infer.quantize import quantize_int8, weight_bytes
from .modalities import is_trainable, task_class
from .run import Run, load
from .rundir import (ADAPTER, build_configs, config_document, new_run_dir, read_json,
                     weights_file, weights_path, write_adapter, write_weights_run, writer_lock)
from .train.checkpoint import atomic_write_json, load_model_weights
from .train.trainer import fit
# QLoRA (Dettmers et al. 2023): adapting every linear layer of the blocks, not only Wq and Wv,
# is what matches full fine-tuning; `--lora-targets q,v` gives the original paper's choice.
DEFAULT_TARGETS = ("qkv", "wo", "fc1", "fc2", "gate_up", "down")


def _base_record(base: Run, checkpoint: str) -> dict:
    path = weights_path(base.dir, base.train_config, checkpoint)
    return {"run": str(base.dir.resolve()), "file": path.name, "sha256": sha256(path)}


def finetune(base: str | Path, data: str | Path, *, rank: int = 8, alpha: float | None = None,
             targets: list[str] | None = None, out: str | Path | None = None,
             overrides: dict | None = None, checkpoint: str = "last", quiet: bool = False,
             until_step: int | None = None, device: str | None = None) -> Run:
    """Train LoRA adapters of `rank` on `targets` of the base run's model, on other `data` of
    the same task; the base stays frozen. Settings default to the base run's (`overrides`
    change training and data settings, not the model's shape); `device` is this machine's
    (default auto), whatever the base was trained on."""
    from .train import distributed
    if distributed.launched():
        raise ConfigError("finetune runs in one process; start it without torchrun")
    base_run = load(base, checkpoint=checkpoint, device=device)
    base_doc = read_json(base_run.dir / "config.json")
    if "lora" in base_doc:
        raise ConfigError(f"{base_run.dir} is itself a fine-tuning run; merge it first "
                          f"(monotile merge) and fine-tune the merged run")
    if base_doc.get("quantized"):
        raise ConfigError(f"{base_run.dir} has int8 weights, which cannot train; fine-tune the "
                          f"run it was quantized from ({base_doc['quantized']['source']})")
    task_name = base_run.kind
    if not is_trainable(task_class(task_name)):
        raise ConfigError(f"{base_run.dir} is a {task_name} run, which cannot be trained here; "
                          "there is nothing to fine-tune it with")
    shape_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {
        "dropout", "drop_path", "attention"}  # how the weights are used, not their shape
    fixed = sorted(set(overrides or {}) & shape_fields)
    if fixed:
        raise ConfigError(f"--set {fixed[0]} would change the base model's shape; fine-tuning "
                          "keeps it (set training and data settings only)")
    configs = build_configs(task_name, base_doc, overrides)
    cls = task_class(task_name)
    # a file or folder, or the name of a data set the task knows (e.g. "digits")
    known = Path(str(data)).expanduser().exists() or "/" in str(data)
    where = str(find_data(configs[task_name].data, str(data))) if known else str(data)
    configs[task_name] = dataclasses.replace(configs[task_name], data=where)
    task = cls.load(configs[task_name], configs["model"], base_run.dir)
    task.batches("train", torch.Generator().manual_seed(0), 1).__next__()  # bad data fails here
    configs[task_name] = task.config  # what reading the data settled (e.g. a chat template)
    model = base_run.model
    if configs["model"] != base_run.configs["model"]:  # only dropout can differ
        model = _with_dropout(base_run, configs["model"])
    lora = {"rank": rank, "alpha": float(alpha if alpha is not None else rank),
            "targets": list(targets or DEFAULT_TARGETS)}
    adapted = add_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    lora["layers"] = adapted
    run_dir = new_run_dir(out, f"{base_run.dir.name}-lora")
    model.eval()
    with torch.no_grad():
        before = task.evaluate(model)  # B = 0: the base model itself, on the new data
    run_dir.mkdir(parents=True, exist_ok=True)  # nothing is written before this point
    meta = {**base_run.meta, "preset": None}
    doc = {**config_document(meta, configs), "base": _base_record(base_run, checkpoint),
           "lora": lora}
    with writer_lock(run_dir):
        task.save(run_dir)
        atomic_write_json(run_dir / "config.json", doc)  # last: now it is a run
        run = Run(run_dir, meta, configs, task, model)
        trainable = count_parameters(model, trainable_only=True)
        if not quiet:
            total = count_parameters(model)
            print(f"run {run_dir}: LoRA rank {rank} on {len(adapted)} layers "
                  f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in adapted}))}): "
                  f"{trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})")
        run.state = fit(task, model, configs["train"], run_dir, until_step=until_step,
                        quiet=quiet)
        run.state.update(trainable_parameters=trainable, base_eval=before)
        write_adapter(run.dir, run.train_config, run.state.get("step"))
    from .interop.peft import write_peft_beside
    write_peft_beside(run.dir)
    return run


def _with_dropout(base_run: Run, model_cfg: ModelConfig) -> torch.nn.Module:
    """The base model rebuilt with the fine-tuning run's dropout, and the base's weights."""
    with weights_left_uninitialised():  # every weight comes from the base (strict load)
        model = base_run.task.build_model(model_cfg)
    model.load_state_dict(base_run.model.state_dict())
    return model.to(next(base_run.model.parameters()).device)


def _adapter_source(adapter: Path) -> tuple[Path, dict]:
    """The file holding the adapters to merge and what it was trained on: a fine-tuning run's
    own checkpoint (what `load` and `eval` use), or an adapter.safetensors on its own."""
    if adapter.is_dir():
        doc = read_json(adapter / "config.json")
        if "lora" not in doc:
            raise ConfigError(f"{adapter} is not a fine-tuning run (no adapter in its "
                              "config.json); give the run `monotile finetune` made")
        train_cfg = build_configs(doc["task"], doc)["train"]
        return adapter / weights_file(train_cfg), {
            "base_sha256": doc["base"]["sha256"], "base_file": doc["base"]["file"],
            "lora": doc["lora"]}
    if not adapter.is_file():
        raise CheckpointError(f"{adapter} does not exist; give a fine-tuning run or its "
                              f"{ADAPTER}")
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(adapter), framework="pt") as f:
            meta = dict(f.metadata() or {})
        meta["lora"] = json.loads(meta["lora"])
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise CheckpointError(f"{adapter} is not a monotile LoRA adapter ({e}); give the "
                              f"{ADAPTER} of a `monotile finetune` run") from None
    return adapter, meta


def merge(base: str | Path, adapter: str | Path, *, out: str | Path,
          checkpoint: str | None = None) -> Run:
    """A plain run at `out` whose weights are the base's with the adapter folded in,
    W' = W + (alpha / r) B A. `adapter`: a fine-tuning run or its adapter.safetensors;
    `checkpoint`: the base's weights to use (default: those the adapter was trained on)."""
    ft_dir = Path(adapter) if Path(adapter).is_dir() else None
    adapter, meta = _adapter_source(Path(adapter))
    lora = meta["lora"]
    out = new_run_dir(out, None)  # refused now if it holds a run
    if checkpoint is None:
        checkpoint = "best" if meta.get("base_file") == "best.safetensors" else "last"
    base_run = load(base, checkpoint=checkpoint)
    if "lora" in read_json(base_run.dir / "config.json"):
        raise ConfigError(f"{base_run.dir} is a fine-tuning run; give its base run as RUN")
    base_file = weights_path(base_run.dir, base_run.train_config, checkpoint)
    if sha256(base_file) != meta.get("base_sha256"):
        raise CheckpointError(f"{adapter} was trained on another base model than {base_file} "
                              "(SHA-256 of the weights differs); give the run it was trained "
                              "on, with --checkpoint best if it was adapted from its best")
    model = base_run.model
    add_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    load_model_weights(model, adapter)
    merge_lora(model)
    doc = read_json((ft_dir or base_run.dir) / "config.json")
    doc.pop("lora", None)
    doc.pop("base", None)
    doc["merged"] = {"base": str(base_file.resolve()), "adapter": str(adapter.resolve())}
    return load(write_weights_run(out, doc, model, base_run.dir / "tokenizer.json"))


def quantize_run(run_dir, out, *, checkpoint: str = "last") -> dict:
    """A new run directory at `out` holding the run's model with int8 weights (config.json
    records it, so `load`, `eval`, `generate` and `predict` rebuild the int8 model)."""
    out = new_run_dir(out, None)  # refused now if it holds a run
    run = load(run_dir, checkpoint=checkpoint, device="cpu")
    doc = read_json(run.dir / "config.json")
    if doc.get("quantized"):
        raise ConfigError(f"{run.dir} is already quantized ({doc['quantized']['format']})")
    if "lora" in doc:
        raise ConfigError(f"{run.dir} is a fine-tuning run; merge its adapter first "
                          "(monotile merge) and quantize the merged run")
    before = weight_bytes(run.model)
    layers = quantize_int8(run.model)
    doc["quantized"] = {"format": "int8-weight-only", "scales": "per output channel",
                        "layers": len(layers), "source": str(Path(run.dir).resolve())}
    write_weights_run(out, doc, run.model, run.dir / "tokenizer.json", {"quantized": "int8"})
    return {"run": str(out), "layers": len(layers), "bytes_before": before,
            "bytes_after": weight_bytes(run.model)}
