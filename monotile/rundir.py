"""A run directory is the unit users handle: what it holds, and how it is read and written.

    runs/<name>/config.json          {"monotile_version", "task", "preset", "model": {...},
                                      "train": {...}, "<task>": {...}} and, for runs made from
                                      other runs, "base" and "lora", "merged", "quantized" or
                                      "imported"
                model.safetensors    the weights `load` reads (ema.safetensors instead when a
                best.safetensors     moving average is kept); the best evaluation's weights
                optimizer.safetensors  trainer_state.json  metrics.jsonl   (training runs)
                checkpoint-<step>/   an FSDP run's checkpoint instead of model and optimizer
                best-<step>/         .safetensors, and its best weights: each process's shards
                                     (trainer_state.json names them; `consolidate` makes files)
                tokenizer.json  plots/*.png
                .lock                the training process's (flock): one writer at a time

config.json is read back into one frozen, validated config object per section; `--set
key=value` overrides any field of any section by its bare name. Every write is atomic
(train/checkpoint.py): a reader sees the old file or the new one, never half of either.
config.json is written last, so a folder that has it is a whole run. One process writes a
run (train, resume, finetune: writer_lock) and only it repairs what a crash left; readers
(eval, generate, serve...) change nothing and read the last committed checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None

from .core.transformer import ModelConfig
from .data import sha256
from .errors import CheckpointError, ConfigError
from .modalities import task_class
from .train.checkpoint import (atomic_write_json, load_tensors, model_tensors, save_tensors,
                               sharded_folder)
from .train.trainer import TrainConfig
from .version import __version__

CONFIG = "config.json"
ADAPTER = "adapter.safetensors"  # a fine-tuning run's LoRA adapters, on their own


# ---- settings --------------------------------------------------------------------------------

def parse_setting(value, annotation: str, name: str):
    """A --set string as the field's type: int, float, bool, str or a comma-separated tuple,
    optionally None ("none", "null" or "")."""
    if not isinstance(value, str):
        return check_value(value, annotation, name)
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds and value.lower() in ("none", "null", ""):
        return None
    for kind in kinds:
        try:
            if kind == "float" and not math.isfinite(float(value)):
                continue  # nan and inf: no setting means them
            if kind == "bool":
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError(value)
            if kind == "int":
                return int(value)
            if kind == "float":
                return float(value)
            if kind == "str":
                return value
            if kind == "tuple":  # a comma-separated list, e.g. --set noise_snr=20,40
                return tuple(v.strip() for v in value.split(",") if v.strip())
        except ValueError:
            continue
    raise ConfigError(f"{name}={value!r} is invalid: expected {annotation}")


def check_value(value, annotation: str, name: str):
    """A value read from JSON (config.json, or the Python API) as the field's type: an int
    field takes a whole number (2000 or 2000.0, not 210.5 or true), a float field a finite
    number, a tuple field a list; anything else is refused by name."""
    kinds = [k.strip() for k in annotation.split("|")]
    if value is None and "None" in kinds:
        return None
    for kind in kinds:
        if kind == "bool" and isinstance(value, bool):
            return value
        if kind == "int" and not isinstance(value, bool):
            if isinstance(value, int):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
        if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value) if isinstance(value, int) else value
        if kind == "str" and isinstance(value, str):
            return value
        if kind == "tuple" and isinstance(value, (list, tuple)):
            return tuple(value)
        if kind == "dict" and isinstance(value, dict):
            return value
    raise ConfigError(f"{name}={value!r} is invalid: expected {annotation}")


def sections(task_name: str) -> dict[str, type]:
    """The config classes of a run of `task_name`: the trunk's, training's and the task's."""
    return {"model": ModelConfig, "train": TrainConfig, task_name: task_class(task_name).Config}


def build_configs(task_name: str, base: dict, overrides: dict | None = None) -> dict:
    """Frozen, validated config objects per section from a preset (or config.json) plus
    overrides by bare field name; an unknown name is refused with the closest names."""
    classes = sections(task_name)
    fields = {f.name: (s, f) for s, cls in classes.items() for f in dataclasses.fields(cls)}
    values = {}
    for section, cls in classes.items():
        given = base.get(section, {})
        if not isinstance(given, dict):
            raise ConfigError(f"config section {section!r} is {type(given).__name__}, not an "
                              "object of settings")
        known = {f.name: f for f in dataclasses.fields(cls)}
        values[section] = {k: check_value(v, str(known[k].type), k) if k in known and not
                           isinstance(v, str) else v for k, v in given.items()}
    for key, value in (overrides or {}).items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else \
                f"settings are: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown setting {key!r}; {hint}")
        section, field = fields[key]
        values[section][key] = parse_setting(value, str(field.type), key)
    out = {}
    for section, cls in classes.items():
        try:
            out[section] = cls(**values[section])
        except TypeError as e:
            raise ConfigError(f"config section {section!r} is invalid: {e}") from None
    return out


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    """["lr=3e-4", "n_layer=6"] -> {"lr": "3e-4", "n_layer": "6"}."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not key=value; write e.g. --set lr=3e-4")
        out[key.strip()] = value.strip()
    return out


# ---- config.json -----------------------------------------------------------------------------

def new_meta(task: str, preset: str | None = None) -> dict:
    """The head of a new run's config.json: which monotile wrote it, for which task."""
    return {"monotile_version": __version__, "task": task, "preset": preset}


def config_document(meta: dict, configs: dict, **extra) -> dict:
    """config.json's content: the meta fields, each config section as a dict, and `extra`
    top-level records (e.g. imported={...})."""
    return {**meta, **{name: dataclasses.asdict(cfg) for name, cfg in configs.items()}, **extra}


def read_json(path: Path) -> dict:
    """A JSON file of a run; CheckpointError naming the file when it is missing or corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a folder, not a file; the run is damaged: restore "
                              "it or retrain") from None
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the run was not checkpointed yet or is "
                              "damaged") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); restore it or retrain") from None


def check_run_dir(run_dir: str | Path) -> Path:
    """`run_dir` as a Path, refused with a one-line fix when it is not a run directory."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; give the path of a run "
                              "made by `monotile train`")
    if not (run_dir / CONFIG).exists():
        raise CheckpointError(f"{run_dir} is not a monotile run (no config.json); give the path "
                              "of a run made by `monotile train`")
    return run_dir


def read_config(run_dir: Path) -> tuple[dict, dict, dict]:
    """(the config.json document, its meta fields, its config objects per section)."""
    path = Path(run_dir) / CONFIG
    doc = read_json(path)
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path} holds {json.dumps(doc)[:40]}, not a run's settings (a "
                              "JSON object); restore it or retrain")
    try:
        task_name = doc["task"]
        meta = {k: doc.get(k) for k in ("monotile_version", "task", "preset")}
        configs = build_configs(task_name, doc)
    except (KeyError, TypeError, ConfigError) as e:
        raise CheckpointError(f"{path} is not a valid monotile config ({e}); restore it or "
                              "retrain") from None
    return doc, meta, configs


def new_run_dir(out: str | Path | None, default_name: str | None) -> Path:
    """The directory a new run goes to: `out`, refused when it already holds a run or is a
    file; or runs/<default_name>, runs/<default_name>-2, ... (the first empty one). Nothing is
    created here: callers make it once every check has passed."""
    if out is not None:
        path = Path(out)
        if (path / CONFIG).exists():
            raise ConfigError(f"{path} already holds a run; choose another --out (`monotile "
                              f"resume {path}` continues a stopped training run)")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} is a file; give a directory path")
        return path
    base = Path("runs") / (default_name or "run")
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


# ---- one writer, any number of readers -----------------------------------------------------

LOCK = ".lock"  # held (flock) by the one process that trains the run: train, resume, finetune


@contextlib.contextmanager
def writer_lock(run_dir: Path, wait_s: float = 5.0):
    """Hold RUN/.lock while training writes the run; a second writer (another train --out or
    resume of the same run) is refused by name once `wait_s` has passed. The writer is the
    only process that may repair the run (checkpoint.recover); readers (load: eval, generate,
    serve...) only read committed files and never wait. The kernel drops the lock when the
    process dies, however it dies. Where flock does not exist (Windows), there is no lock."""
    if fcntl is None:
        yield
        return
    path = Path(run_dir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ConfigError(f"{run_dir} is being trained by another process (pid "
                                      f"{_lock_pid(path)}); wait for it to finish, or stop it "
                                      f"and run `monotile resume {run_dir}`") from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _lock_pid(path: Path) -> str:
    try:
        return path.read_text().strip() or "unknown"
    except OSError:
        return "unknown"


def writer_pid(run_dir: Path) -> str | None:
    """The pid of the process training this run now, or None when none is. Probes the lock
    for an instant (a starting writer waits for it), and never creates or changes a file."""
    path = Path(run_dir) / LOCK
    if fcntl is None or not path.is_file():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _lock_pid(path)
    except OSError:
        return None
    finally:
        os.close(fd)
    return None


# ---- weights ---------------------------------------------------------------------------------

def weights_file(train_cfg: TrainConfig, checkpoint: str = "last") -> str:
    """The file `load` reads: last (the moving average when one is kept) or best."""
    name = {"last": "model.safetensors", "best": "best.safetensors"}.get(checkpoint)
    if name is None:
        raise ConfigError(f"checkpoint={checkpoint!r} is invalid: choose last or best")
    if name == "model.safetensors" and train_cfg.ema > 0:
        name = "ema.safetensors"  # the moving average is what training evaluated and kept
    return name


def weights_path(run_dir: Path, train_cfg: TrainConfig, checkpoint: str = "last") -> Path:
    """RUN/weights_file(...), for the tools that read the file itself rather than a loaded
    model (finetune's base record, merge, search); a one-line error naming `consolidate` when
    those weights are an FSDP run's shards instead."""
    if sharded_folder(run_dir, checkpoint) is not None:
        raise CheckpointError(f"the {checkpoint} weights of {run_dir} are an FSDP run's shards, "
                              f"not a file; run `monotile consolidate {run_dir}` first")
    return Path(run_dir) / weights_file(train_cfg, checkpoint)


def base_weights(doc: dict) -> Path:
    """A fine-tuning run's base weights file (config.json's "base": run, file, sha256), checked
    to be there and unchanged since the adapter was trained on it."""
    base = doc["base"]
    path = Path(base["run"]) / base["file"]
    if not path.is_file():
        raise CheckpointError(f"the base run of this fine-tuning run is gone ({path}); put it "
                              "back, or load a merged copy (monotile merge)")
    if sha256(path) != base["sha256"]:
        raise CheckpointError(f"the base run's weights {path} changed since the adapter was "
                              "trained on them (SHA-256 differs); restore them, or fine-tune "
                              "again on the new base")
    return path


def write_weights_run(out: Path, doc: dict, model: torch.nn.Module,
                      tokenizer: Path | None = None, metadata: dict | None = None) -> Path:
    """A run directory for inference (merge, quantize, import): config.json from `doc`, the
    tokenizer copied, and `model`'s weights as model.safetensors, which is also what `load`
    reads (so no moving average is named). `out` comes from new_run_dir, checked early."""
    out = Path(out)
    doc = {**doc, "train": {**doc.get("train", {}), "ema": 0.0}}
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer is not None and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    save_tensors(out / "model.safetensors", model_tensors(model),
                 {"format": "pt", **(metadata or {})})
    atomic_write_json(out / CONFIG, doc)  # last: a folder with config.json is a whole run
    return out


def write_adapter(run_dir: Path, train_cfg: TrainConfig, step: int | None = None) -> Path:
    """RUN/adapter.safetensors: a fine-tuning run's adapters as `load` uses them (the moving
    average when the run keeps one), with the base's SHA-256 and the adapter's settings in
    its metadata, so that `monotile merge` can refuse it for another base. (finetune and
    resume then write RUN/peft/ beside it: interop/peft.py's write_peft_beside.)"""
    doc = read_json(Path(run_dir) / CONFIG)
    tensors, _ = load_tensors(Path(run_dir) / weights_file(train_cfg))
    metadata = {"format": "pt", "base_sha256": doc["base"]["sha256"],
                "base_file": doc["base"]["file"],
                "lora": json.dumps({k: doc["lora"][k] for k in ("rank", "alpha", "targets")}),
                "step": "" if step is None else str(step)}
    path = Path(run_dir) / ADAPTER
    save_tensors(path, tensors, metadata)
    return path
