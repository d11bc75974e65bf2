"""A run directory is the unit users handle: train into one, resume it, load it, use it.

    runs/<name>/config.json  model.safetensors  best.safetensors  optimizer.safetensors
                tokenizer.json  trainer_state.json  metrics.jsonl  plots/loss.png

`train`, `resume` and `load` are the Python API; the CLI only wraps them.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import shutil
from pathlib import Path

import torch

from . import __version__
from .core.transformer import ModelConfig, count_parameters
from .errors import CheckpointError, ConfigError
from .infer.generate import Sampling
from .modalities import task_class
from .presets import PRESETS
from .train import distributed
from .train.checkpoint import atomic_write_json, load_model_weights, recover
from .train.trainer import TrainConfig, fit, pick_device


# ---- configuration ----------------------------------------------------------------------------

def _parse(value, annotation: str, name: str):
    """Turn a --set string into the field's type (int, float, bool, str, a comma-separated
    tuple, optionally None)."""
    if not isinstance(value, str):
        return value
    kinds = [k.strip() for k in annotation.split("|")]
    if "None" in kinds and value.lower() in ("none", "null", ""):
        return None
    for kind in kinds:
        try:
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


def _sections(task_name: str) -> dict[str, type]:
    return {"model": ModelConfig, "train": TrainConfig, task_name: task_class(task_name).Config}


def build_configs(task_name: str, base: dict, overrides: dict | None = None) -> dict:
    """Frozen, validated config objects per section from a preset (or config.json) plus
    overrides by bare field name; an unknown name is refused with the closest names."""
    sections = _sections(task_name)
    values = {s: dict(base.get(s, {})) for s in sections}
    fields = {f.name: (s, f) for s, cls in sections.items() for f in dataclasses.fields(cls)}
    for key, value in (overrides or {}).items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=3)
            hint = f"did you mean {', '.join(close)}?" if close else \
                f"settings are: {', '.join(sorted(fields))}"
            raise ConfigError(f"unknown setting {key!r}; {hint}")
        section, field = fields[key]
        values[section][key] = _parse(value, str(field.type), key)
    out = {}
    for section, cls in sections.items():
        try:
            out[section] = cls(**values[section])
        except TypeError as e:
            raise ConfigError(f"config section {section!r} is invalid: {e}") from None
    return out


def parse_overrides(pairs: list[str]) -> dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {pair!r} is not key=value; write e.g. --set lr=3e-4")
        out[key.strip()] = value.strip()
    return out


# ---- the run ----------------------------------------------------------------------------------

class Run:
    """A trained (or training) model with its task, loaded from a run directory."""

    def __init__(self, run_dir: Path, meta: dict, configs: dict, task, model: torch.nn.Module):
        self.dir, self.meta, self.configs = Path(run_dir), meta, configs
        self.task, self.model = task, model
        self.state: dict = {}

    @property
    def train_config(self) -> TrainConfig:
        return self.configs["train"]

    def evaluate(self, progress: bool = False) -> dict[str, float]:
        self.model.eval()
        return self.task.evaluate(self.model, progress=progress)

    def report(self, *, data: str | None = None, progress: bool = False, **options) -> dict:
        """The full evaluation `monotile eval` prints: the task's report (per-class figures,
        plots in RUN/plots/, a series' backtest) where it has one, else evaluate(); `data`
        evaluates other data."""
        self.model.eval()
        if hasattr(self.task, "report"):
            return self.task.report(self.model, self.dir, data=data, progress=progress,
                                    **options)
        if data is not None:
            raise ConfigError(f"--data is not supported by `eval` for {self.meta['task']} runs; "
                              "it evaluates on the run's own validation split")
        return self.task.evaluate(self.model, progress=progress)

    def stream(self, prompt: str, *, max_new_tokens: int = 200, temperature: float = 1.0,
               top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float = 1.0, stop: str | list[str] | None = None,
               seed: int | None = None, use_cache: bool = True):
        """Yield generated text pieces as they are produced."""
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty)
        stops = [stop] if isinstance(stop, str) else stop
        return self.task.stream(self.model, prompt, max_new_tokens=max_new_tokens,
                                sampling=sampling, stop=stops, seed=seed, use_cache=use_cache)

    def generate(self, prompt: str, **options) -> str:
        """The continuation of `prompt` (options as for `stream`)."""
        return "".join(self.stream(prompt, **options))

    def stream_chat(self, messages: list[dict], **options):
        """Yield the assistant's answer to `messages` ([{"role", "content"}, ...]), formatted
        by the run's chat template and ended by its stop strings (options as for `stream`)."""
        stop = options.pop("stop", None)
        stops = ([stop] if isinstance(stop, str) else list(stop or []))
        stops += list(self.task.config.chat_stop)
        return self.stream(self.task.chat_prompt(messages), stop=stops, **options)

    def chat(self, messages: list[dict], **options) -> str:
        """The assistant's answer to `messages`; see stream_chat."""
        return "".join(self.stream_chat(messages, **options))

    def embed(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """(N, d) unit-length sentence embeddings of `texts` (encoder runs, e.g. MiniLM)."""
        if self.model.training:  # eval() walks every module: 1 ms a call, a tenth of a sentence
            self.model.eval()
        return self.task.embed(self.model, list(texts), batch_size=batch_size)

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.task.config, "chat_template", None))

    def predict(self, inputs: list, **options):
        """What the task makes of `inputs` (image files -> top-k classes, prompts -> text)."""
        self.model.eval()
        return self.task.predict(self.model, inputs, **options)

    def optimize_for_inference(self, dtype: str = "float32") -> "Run":
        """Cast the weights to `dtype` ("float32" or "bfloat16": half the bytes to read a token,
        logits within ~0.04 of fp32's), pack the linear layers for oneDNN's CPU kernels
        (infer/packed.py: ~1.7x faster decoding at batch 1) and keep the model in eval mode; the
        run can no longer be trained. Packing is skipped on GPUs. Returns the run."""
        from .infer.packed import pack_linears
        dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
        if dtype not in dtypes:
            raise ConfigError(f"dtype={dtype!r} is invalid for inference: choose "
                              f"{' or '.join(dtypes)}")
        self.model.to(dtypes[dtype])
        pack_linears(self.model)
        return self

    def parameters(self) -> int:
        return count_parameters(self.model)

    def __repr__(self) -> str:
        return (f"Run({str(self.dir)!r}, task={self.meta['task']!r}, "
                f"parameters={self.parameters():,})")


def _new_run_dir(out: str | Path | None, preset: str | None) -> Path:
    if out is not None:
        path = Path(out)
        if (path / "config.json").exists():
            raise ConfigError(f"{path} already holds a run; choose another --out (`monotile "
                              f"resume {path}` continues a stopped training run)")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path} is a file; give a directory path")
        return path
    base = Path("runs") / (preset or "run")
    path, n = base, 1
    while path.exists() and any(path.iterdir()):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def train(task: str, preset: str | None = None, *, out: str | Path | None = None,
          data: str | Path | None = None, overrides: dict | None = None, quiet: bool = False,
          until_step: int | None = None) -> Run:
    """Train a model for `task` from a preset (plus overrides) into a new run directory.

    `until_step` stops early (checkpointed, resumable) as if interrupted there."""
    if preset is not None and preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown preset {preset!r}; {hint}presets: {', '.join(PRESETS)}")
    base = PRESETS[preset] if preset else {}
    if preset and base["task"] != task:
        raise ConfigError(f"preset {preset!r} is for task {base['task']!r}, not {task!r}; run "
                          f"`monotile train {base['task']} --preset {preset}`")
    cls = task_class(task)
    configs = build_configs(task, base, overrides)
    ctx = distributed.setup(configs["train"].strategy)  # joins torchrun's processes, if any
    distributed.check(configs["train"], ctx)
    # everything that can fail on bad input happens before the run directory is created
    task_obj, model_cfg = cls.prepare(configs[task], configs["model"], data)
    configs["model"] = model_cfg
    configs[task] = task_obj.config
    device = pick_device(configs["train"].device)
    run_dir = distributed.broadcast(_new_run_dir(out, preset))  # the main process's choice
    meta = {"monotile_version": __version__, "task": task, "preset": preset}
    config_doc = _config_json(meta, configs)
    if distributed.any_process(distributed.broadcast(config_doc) != config_doc):
        raise ConfigError("the processes prepared different configurations (data or tokenizer "
                          "differ between machines); give every node the same data")
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(run_dir / "config.json", config_doc)
        task_obj.save(run_dir)
    distributed.barrier()
    torch.manual_seed(configs["train"].seed)
    model = task_obj.build_model(model_cfg).to(device)
    run = Run(run_dir, meta, configs, task_obj, model)
    quiet = quiet or not ctx.main
    if not quiet:
        where = f"{ctx.world} processes ({ctx.strategy})" if ctx.world > 1 else device
        print(f"run {run_dir}: {run.parameters():,} parameters on {where}")
    run.state = fit(task_obj, model, configs["train"], run_dir, until_step=until_step,
                    quiet=quiet)
    if ctx.world > 1:  # the sharded or wrapped model, back to one whole model per process
        run.model = _whole_model(run, device)
    return run


def _whole_model(run: Run, device) -> torch.nn.Module:
    """The model as `load` gives it: one whole copy per process, from the checkpoint just
    written (the wrapped or sharded training copy is dropped)."""
    return load(run.dir, device=str(device)).model


def resume(run_dir: str | Path, *, quiet: bool = False, until_step: int | None = None,
           strategy: str | None = None) -> Run:
    """Continue a stopped run from its last checkpoint to its max_steps, on any number of
    processes (under torchrun, with `strategy` ddp or fsdp; default: the run's own)."""
    distributed.setup(strategy or "auto")
    run = load(run_dir, checkpoint="last")
    if strategy is not None:
        run.configs["train"] = dataclasses.replace(run.train_config, strategy=strategy)
    ctx = distributed.current(run.train_config.strategy)
    distributed.check(run.train_config, ctx, resuming=True)
    quiet = quiet or not ctx.main
    if run.train_config.ema > 0:  # training continues from the raw weights, not the average
        load_model_weights(run.model, run.dir / "model.safetensors")
    state = _read_json(run.dir / "trainer_state.json")
    if state["step"] >= run.train_config.max_steps:
        if not quiet:
            print(f"{run.dir} already finished at step {state['step']}; nothing to resume")
        run.state = dict(state, last_eval=run.evaluate(), interrupted=False)
        return run
    if not quiet:
        print(f"resuming {run.dir} at step {state['step']} of {run.train_config.max_steps}")
    run.model.train()
    device = next(run.model.parameters()).device
    run.state = fit(run.task, run.model, run.train_config, run.dir, state=state,
                    until_step=until_step, quiet=quiet)
    if ctx.world > 1:
        run.model = _whole_model(run, device)
    if getattr(run.model, "lora", None) and ctx.main:  # a fine-tuning run's adapter file
        from .adapt import write_adapter
        write_adapter(run)
    return run


def load(run_dir: str | Path, *, checkpoint: str = "last", device: str | None = None) -> Run:
    """A run directory's model and task. checkpoint: "last" (model.safetensors) or "best"."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(f"run directory {run_dir} does not exist; give the path of a run "
                              "made by `monotile train`")
    if not (run_dir / "config.json").exists():
        raise CheckpointError(f"{run_dir} is not a monotile run (no config.json); give the path "
                              "of a run made by `monotile train`")
    if distributed.is_main():
        recover(run_dir)
    distributed.barrier()
    doc = _read_json(run_dir / "config.json")
    try:
        task_name = doc["task"]
        meta = {k: doc.get(k) for k in ("monotile_version", "task", "preset")}
        configs = build_configs(task_name, doc)
    except (KeyError, ConfigError) as e:
        raise CheckpointError(f"{run_dir / 'config.json'} is not a valid monotile config ({e}); "
                              "restore it or retrain") from None
    task = task_class(task_name).load(configs[task_name], configs["model"], run_dir)
    model = task.build_model(configs["model"])
    if "lora" in doc:  # a fine-tuning run: the base's weights, then its own adapters
        from .adapt import attach_adapters
        attach_adapters(model, doc)
    if doc.get("quantized"):  # int8 weights: the int8 layers first, then their values
        from .infer.quantize import quantize_int8
        quantize_int8(model)
    load_model_weights(model, run_dir / weights_file(configs["train"], checkpoint))
    model.to(pick_device(device or configs["train"].device)).eval()
    return Run(run_dir, meta, configs, task, model)


def weights_file(train_cfg: TrainConfig, checkpoint: str = "last") -> str:
    """The file `load` reads: last (the moving average when one is kept) or best."""
    name = {"last": "model.safetensors", "best": "best.safetensors"}.get(checkpoint)
    if name is None:
        raise ConfigError(f"checkpoint={checkpoint!r} is invalid: choose last or best")
    if name == "model.safetensors" and train_cfg.ema > 0:
        name = "ema.safetensors"  # the moving average is what training evaluated and kept
    return name


def write_weights_run(out: Path, doc: dict, model: torch.nn.Module,
                      tokenizer: Path | None = None, metadata: dict | None = None) -> Path:
    """A run directory for inference (merge, quantize, import): config.json from `doc`, the
    tokenizer copied, and `model`'s weights as model.safetensors, which is also what `load`
    reads (so no moving average is named). `out` comes from _new_run_dir, checked early."""
    from .train.checkpoint import model_tensors, save_tensors
    doc = {**doc, "train": {**doc.get("train", {}), "ema": 0.0}}
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", doc)
    if tokenizer is not None and tokenizer.is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    save_tensors(out / "model.safetensors", model_tensors(model),
                 {"format": "pt", **(metadata or {})})
    return out


def _config_json(meta: dict, configs: dict) -> dict:
    return {**meta, **{name: dataclasses.asdict(cfg) for name, cfg in configs.items()}}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the run was not checkpointed yet or is "
                              "damaged") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt ({e}); restore it or retrain") from None
