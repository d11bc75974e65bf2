"""Fine-tuning with LoRA adapters, and folding them back in: `monotile finetune` and `merge`.

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
from .core.transformer import ModelConfig, count_parameters
from .data import find_data, sha256
from .errors import CheckpointError, ConfigError
from .modalities import task_class
from .run import (Run, _config_json, _new_run_dir, _read_json, build_configs, load,
                  weights_file, write_weights_run)
from .train.checkpoint import atomic_write_json, load_model_weights, load_tensors, save_tensors
from .train.trainer import fit

ADAPTER = "adapter.safetensors"
# QLoRA (Dettmers et al. 2023): adapting every linear layer of the blocks, not only Wq and Wv,
# is what matches full fine-tuning; `--lora-targets q,v` gives the original paper's choice.
DEFAULT_TARGETS = ("qkv", "wo", "fc1", "fc2", "gate_up", "down")


def _base_record(base: Run, checkpoint: str) -> dict:
    name = weights_file(base.train_config, checkpoint)
    return {"run": str(base.dir.resolve()), "file": name, "sha256": sha256(base.dir / name)}


def attach_adapters(model: torch.nn.Module, doc: dict) -> None:
    """For `load`: the base run's weights into `model`, then empty adapters where the
    fine-tuning run put them (its own checkpoint fills them next)."""
    base = doc["base"]
    path = Path(base["run"]) / base["file"]
    if not path.is_file():
        raise CheckpointError(f"the base run of this fine-tuning run is gone ({path}); put it "
                              "back, or load a merged copy (monotile merge)")
    if sha256(path) != base["sha256"]:
        raise CheckpointError(f"the base run's weights {path} changed since the adapter was "
                              "trained on them (SHA-256 differs); restore them, or fine-tune "
                              "again on the new base")
    load_model_weights(model, path)
    lora = doc["lora"]
    add_lora(model, lora["rank"], lora["alpha"], lora["targets"])


def finetune(base: str | Path, data: str | Path, *, rank: int = 8, alpha: float | None = None,
             targets: list[str] | None = None, out: str | Path | None = None,
             overrides: dict | None = None, checkpoint: str = "last", quiet: bool = False,
             until_step: int | None = None) -> Run:
    """Train LoRA adapters of `rank` on `targets` of the base run's model, on other `data` of
    the same task; the base stays frozen. Settings default to the base run's (`overrides`
    change training and data settings, not the model's shape)."""
    from .train import distributed
    if distributed.launched():
        raise ConfigError("finetune runs in one process; start it without torchrun")
    base_run = load(base, checkpoint=checkpoint)
    base_doc = _read_json(base_run.dir / "config.json")
    if "lora" in base_doc:
        raise ConfigError(f"{base_run.dir} is itself a fine-tuning run; merge it first "
                          f"(monotile merge) and fine-tune the merged run")
    if base_doc.get("quantized"):
        raise ConfigError(f"{base_run.dir} has int8 weights, which cannot train; fine-tune the "
                          f"run it was quantized from ({base_doc['quantized']['source']})")
    task_name = base_run.meta["task"]
    shape_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"dropout", "drop_path"}
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
    run_dir = _new_run_dir(out, f"{base_run.dir.name}-lora")
    model.eval()
    with torch.no_grad():
        before = task.evaluate(model)  # B = 0: the base model itself, on the new data
    run_dir.mkdir(parents=True, exist_ok=True)  # nothing is written before this point
    meta = {**base_run.meta, "preset": None}
    doc = {**_config_json(meta, configs), "base": _base_record(base_run, checkpoint),
           "lora": lora}
    atomic_write_json(run_dir / "config.json", doc)
    task.save(run_dir)
    run = Run(run_dir, meta, configs, task, model)
    trainable = count_parameters(model, trainable_only=True)
    if not quiet:
        total = count_parameters(model)
        print(f"run {run_dir}: LoRA rank {rank} on {len(adapted)} layers "
              f"({', '.join(sorted({n.rsplit('.', 1)[-1] for n in adapted}))}): "
              f"{trainable:,} trainable parameters of {total:,} ({trainable / total:.2%})")
    run.state = fit(task, model, configs["train"], run_dir, until_step=until_step, quiet=quiet)
    run.state.update(trainable_parameters=trainable, base_eval=before)
    write_adapter(run)
    return run


def _with_dropout(base_run: Run, model_cfg: ModelConfig) -> torch.nn.Module:
    """The base model rebuilt with the fine-tuning run's dropout, and the base's weights."""
    model = base_run.task.build_model(model_cfg)
    model.load_state_dict(base_run.model.state_dict())
    return model.to(next(base_run.model.parameters()).device)


def write_adapter(run: Run) -> Path:
    """RUN/adapter.safetensors: the adapters `load` uses (the moving average when the run keeps
    one), with what a merge needs to check."""
    doc = _read_json(run.dir / "config.json")
    tensors, _ = load_tensors(run.dir / weights_file(run.train_config))
    metadata = {"format": "pt", "base_sha256": doc["base"]["sha256"],
                "base_file": doc["base"]["file"],
                "lora": json.dumps({k: doc["lora"][k] for k in ("rank", "alpha", "targets")}),
                "step": str(run.state.get("step", ""))}
    path = run.dir / ADAPTER
    save_tensors(path, tensors, metadata)
    return path


def _adapter_source(adapter: Path) -> tuple[Path, dict]:
    """The file holding the adapters to merge and what it was trained on: a fine-tuning run's
    own checkpoint (what `load` and `eval` use), or an adapter.safetensors on its own."""
    if adapter.is_dir():
        doc = _read_json(adapter / "config.json")
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
    out = _new_run_dir(out, None)  # refused now if it holds a run
    if checkpoint is None:
        checkpoint = "best" if meta.get("base_file") == "best.safetensors" else "last"
    base_run = load(base, checkpoint=checkpoint)
    if "lora" in _read_json(base_run.dir / "config.json"):
        raise ConfigError(f"{base_run.dir} is a fine-tuning run; give its base run as RUN")
    base_file = base_run.dir / weights_file(base_run.train_config, checkpoint)
    if sha256(base_file) != meta.get("base_sha256"):
        raise CheckpointError(f"{adapter} was trained on another base model than {base_file} "
                              "(SHA-256 of the weights differs); give the run it was trained "
                              "on, with --checkpoint best if it was adapted from its best")
    model = base_run.model
    add_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    load_model_weights(model, adapter)
    merge_lora(model)
    doc = _read_json((ft_dir or base_run.dir) / "config.json")
    doc.pop("lora", None)
    doc.pop("base", None)
    doc["merged"] = {"base": str(base_file.resolve()), "adapter": str(adapter.resolve())}
    return load(write_weights_run(out, doc, model, base_run.dir / "tokenizer.json"))
