"""A run: a model and its task, trained into a run directory, resumed, or loaded to be used.

    run = train("text", "shakespeare-char")      run = load("runs/shakespeare-char")
    run.evaluate()   run.report()   run.generate("ROMEO:")   run.predict(["a.png"])

`train`, `resume` and `load` are the Python API; the CLI only wraps them. What a run
directory holds and how it is written is rundir.py; what a task does is its modality's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .core.transformer import count_parameters, weights_left_uninitialised
from .data import nothing_readable
from .errors import CheckpointError, ConfigError, DataError
from .infer.generate import Sampling
from .modalities import TextGenerator, call_with_options, is_trainable, task_class
from .presets import PRESETS
from .rundir import (CONFIG, base_weights, build_configs, check_run_dir, config_document,
                     new_meta, new_run_dir, parse_overrides, read_config, read_json,
                     weights_file, write_adapter, writer_lock, writer_pid)
from .train import distributed
from .train.checkpoint import (WeightReader, atomic_write_json, load_model_weights,
                               load_optimizer_state, load_sharded_model, model_tensors, recover,
                               rng_from_str, save_checkpoint, save_tensors, sharded_folder)
from .train.trainer import TrainConfig, fit, pick_device

__all__ = ["Run", "build_configs", "consolidate", "load", "parse_overrides", "resume",
           "train"]


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
        plots in RUN/plots/, a series' backtest), by default evaluate(); `data` evaluates
        other data where the task can. An option the task's report does not take is refused
        by name."""
        self.model.eval()
        return call_with_options(self.task.report, self.model, self.dir, data=data,
                                 progress=progress, what=f"`eval` of {self.kind} runs",
                                 **options)

    @property
    def kind(self) -> str:
        """The run's task name ("text", "vision", ...)."""
        return self.task.name

    def stream(self, prompt: str | list[int], *, max_new_tokens: int = 200,
               temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
               repetition_penalty: float = 1.0, stop: str | list[str] | None = None,
               seed: int | None = None, use_cache: bool = True, ignore_eos: bool = False,
               timings: dict | None = None):
        """Yield generated text pieces as they are produced, after `prompt` (text, or its
        token ids); with ignore_eos, the model's end tokens end nothing (a benchmark decodes
        max_new_tokens); `timings` (a dict) receives the prompt's and the decoding's tokens,
        seconds and tokens/s."""
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty)
        stops = [stop] if isinstance(stop, str) else stop
        return self.generator.stream(self.model, prompt, max_new_tokens=max_new_tokens,
                                     sampling=sampling, stop=stops, seed=seed,
                                     use_cache=use_cache, ignore_eos=ignore_eos,
                                     timings=timings)

    def generate(self, prompt: str, **options) -> str:
        """The continuation of `prompt` (options as for `stream`)."""
        return "".join(self.stream(prompt, **options))

    def stream_chat(self, messages: list[dict], **options):
        """Yield the assistant's answer to `messages` ([{"role", "content"}, ...]), formatted
        by the run's chat template and ended by its stop strings (options as for `stream`)."""
        stops = self.chat_stops(options.pop("stop", None), options.get("ignore_eos", False))
        return self.stream(self.generator.chat_prompt(messages), stop=stops, **options)

    def chat_stops(self, stop: str | list[str] | None, ignore_eos: bool = False) -> list[str]:
        """`stop` and, unless ignore_eos, the chat template's end strings (end tokens too)."""
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        return stops if ignore_eos else stops + list(self.generator.config.chat_stop)

    def chat(self, messages: list[dict], **options) -> str:
        """The assistant's answer to `messages`; see stream_chat."""
        return "".join(self.stream_chat(messages, **options))

    def embed(self, texts: list[str], batch_size: int = 32,
              progress: bool = False) -> torch.Tensor:
        """(N, d) unit-length sentence embeddings of `texts` (encoder runs, e.g. MiniLM); with
        `progress`, a bar on a terminal."""
        if self.model.training:  # eval() walks every module: 1 ms a call, a tenth of a sentence
            self.model.eval()
        return self.task.embed(self.model, list(texts), batch_size=batch_size,
                               progress=progress)

    @property
    def generator(self):
        """The task, if it generates text (TextGenerator); a one-line error otherwise."""
        if not self._generates():
            raise ConfigError(f"{self.dir} is a {self.kind} run; it does not generate text "
                              "(`monotile predict` is its command)")
        return self.task

    def _generates(self) -> bool:
        return isinstance(self.task, TextGenerator) and "completions" in self.task.routes

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.task.config, "chat_template", None))

    def predict(self, inputs: list, *, progress: bool = False, **options) -> dict:
        """What the task makes of `inputs`: files and folders (searched for the task's file
        types), or prompts for a text run. Each input is read (`Task.read`); one that cannot
        be read is reported in "skipped", and when none can, DataError. Options go to the
        task's predict (top_k for images, beam_width for speech, horizon for series...); one
        it does not take is refused by name. Returns the task's summary, for most tasks
        {"predictions": [...], "skipped": [...]}."""
        self.model.eval()
        task = self.task
        sources = task.sources(list(inputs))
        items, kept, skipped = [], [], []
        for source in tqdm(sources, disable=not progress or len(sources) < 2, desc="reading",
                           unit="input"):
            try:
                items.append(task.read(source))
                kept.append(source)
            except DataError as e:
                skipped.append({"path": str(source), "error": str(e)})
        if not items:
            raise nothing_readable(skipped, task.what)
        results = call_with_options(task.predict, self.model, items, progress=progress,
                                    what=f"`predict` of {self.kind} runs", **options)
        return task.summarize(results, kept, skipped)

    def optimize_for_inference(self, dtype: str = "float32", *, weights=None,
                               compile: bool = False) -> Run:
        """Make the model fast to run, for inference only (it can no longer be trained), in
        eval mode; returns the run. `dtype` is what a token reads of each weight:
          float32   as trained
          bfloat16  half the bytes (logits within ~0.04 of fp32's)
          int8      a quarter: one scale per output channel (infer/quantize.py)
          int4      an eighth: llama.cpp's Q4_1 blocks of 32 (a Q4_1 file's own values);
                    the head and embedding at 8 bits, as llama.cpp's Q4 files keep them
        Linear layers left in float are packed for oneDNN's CPU kernels where that measures
        faster on this CPU (infer/packed.py: ~1.5x faster fp32 decoding on an AMD EPYC,
        slower than plain on some Intel Xeons); packing is skipped on GPUs. Layers are
        converted one at a time (infer/convert.py); `weights` (load(dtype=...) gives it)
        reads each from the weights file just before. `compile` (text generation runs):
        the one-token decoding step is compiled (infer/generate.py compile_decoding: tens of
        seconds here, then faster decoding), its int8, int4 and bf16 layers in native kernels
        (infer/native.py: x rounded to 8 bits for the int8 and int4 products, as llama.cpp
        does) where a C++ compiler builds them, its fp32 layers too where their shapes
        measure faster there than in the compiler's own product (the rest left plain for
        it). Uncompiled, a text generation run's layers use the native kernels too, where they
        build (the first use on a machine compiles them: ~10 s, once), and each pre-norm
        block's one-token step is one native call (native.block_step: SmolLM2 decodes at
        the compiled step's pace, with no compile); other tasks keep PyTorch's kernels."""
        from .infer import native as native_kernels
        from .infer.convert import convert, packing_wins
        _check_inference_dtype(dtype)
        rows = getattr(self.task, "inference_rows", 1)
        if compile:
            self.generator  # noqa: B018  (refused before any weight is converted)
            # the compiler packs frozen float weights for oneDNN: where plain layers measure
            # faster on this CPU, it leaves them (and shares them with the eager model: fp32
            # SmolLM2 compiled held 1.05 GB instead of 1.75, and decoded 5 % faster)
            prepack = dtype in ("int8", "int4") or packing_wins(self.model, dtype, rows)
        self._parameter_count = self.parameters()
        # a compiled step multiplies in our own kernels (infer/native.py, built for this CPU
        # with the compiler that torch.compile needs anyway), else in PyTorch's; so does a
        # model that generates text, uncompiled, its blocks' steps each one call (SmolLM2's
        # step on an AMD EPYC: int4 18.4 ms in PyTorch's operators and kernels, 11.3 in ours
        # one operator at a time, ~5 in one call a block; fp32 30 -> 17)
        on_cpu = all(p.device.type == "cpu" for p in self.model.parameters())
        native = (on_cpu and (compile or self._generates()) and native_kernels.available())
        convert(self.model, dtype, rows=rows, weights=weights, pack=not compile, native=native,
                compiler_packs=compile and prepack, fused_steps=not compile)
        if compile:
            from .infer.generate import compile_decoding
            self.compile_seconds = compile_decoding(self.model, prepack=prepack)
        return self

    def parameters(self) -> int:
        """The model's parameters (as trained: a weight packed by optimize_for_inference, which
        is no longer an nn.Parameter, still counts, and a tied one once)."""
        return getattr(self, "_parameter_count", None) or count_parameters(self.model)

    def __repr__(self) -> str:
        return (f"Run({str(self.dir)!r}, task={self.kind!r}, "
                f"parameters={self.parameters():,})")


def train(task: str | None, preset: str | None = None, *, out: str | Path | None = None,
          data: str | Path | None = None, overrides: dict | None = None, quiet: bool = False,
          until_step: int | None = None, config: str | Path | None = None) -> Run:
    """Train a model for `task` from a preset (plus overrides) into a new run directory; or
    from `config`, a run's config.json (or its folder): its settings as they were, its task,
    and what it filled from its data (labels, vocabulary, scales) filled again from this data.

    `until_step` stops early (checkpointed, resumable) as if interrupted there."""
    if config is not None:
        if preset is not None:
            raise ConfigError("give --preset or --config, not both: a config.json holds every "
                              "setting already")
        base = _config_base(config)
        if task is not None and task != base["task"]:
            raise ConfigError(f"{config} is the config of a {base['task']} run, not {task}; "
                              f"run `monotile train --config {config}`")
        task = base["task"]
    elif task is None:
        raise ConfigError("give the task to train (monotile train TASK --preset NAME), or a "
                          "run's settings with --config RUN/config.json")
    if preset is not None and preset not in PRESETS:
        close = difflib.get_close_matches(preset, list(PRESETS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        raise ConfigError(f"unknown preset {preset!r}; {hint}presets: {', '.join(PRESETS)}")
    if config is None:
        base = PRESETS[preset] if preset else {}
    if preset and base["task"] != task:
        raise ConfigError(f"preset {preset!r} is for task {base['task']!r}, not {task!r}; run "
                          f"`monotile train {base['task']} --preset {preset}`")
    cls = task_class(task)
    if not is_trainable(cls):
        raise ConfigError(f"{task} runs are not trained here (the task has no batches or "
                          f"loss): {cls.origin}")
    configs = build_configs(task, base, overrides)
    ctx = distributed.setup(configs["train"].strategy)  # joins torchrun's processes, if any
    distributed.check(configs["train"], ctx)
    # everything that can fail on bad input happens before the run directory is created
    task_obj, model_cfg = cls.prepare(configs[task], configs["model"], data)
    configs["model"] = model_cfg
    configs[task] = task_obj.config
    device = pick_device(configs["train"].device)
    name = preset or (base.get("preset") if config is not None else None)
    run_dir = distributed.broadcast(new_run_dir(out, name))  # the main process's choice
    meta = new_meta(task, preset)
    config_doc = config_document(meta, configs)
    if distributed.any_process(distributed.broadcast(config_doc) != config_doc):
        raise ConfigError("the processes prepared different configurations (data or tokenizer "
                          "differ between machines); give every node the same data")
    check_fits(task_obj, model_cfg, device, training=True)
    model = _fresh_model(task_obj, model_cfg, configs["train"].seed, device)
    if ctx.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    with writer_lock(run_dir) if ctx.main else contextlib.nullcontext():
        if ctx.main:
            if (run_dir / CONFIG).exists():  # another `train --out` took it meanwhile
                raise ConfigError(f"{run_dir} already holds a run; choose another --out")
            task_obj.save(run_dir)
            atomic_write_json(run_dir / "config.json", config_doc)  # last: now it is a run
        distributed.barrier()
        run = Run(run_dir, meta, configs, task_obj, model)
        return _fit(run, device, ctx, until_step=until_step, quiet=quiet)


def _fresh_model(task_obj, model_cfg, seed: int, device) -> torch.nn.Module:
    """A new run's model: seeded, built, on its device (train, and resume of a run stopped
    before its first checkpoint, build it alike, so both give the same weights)."""
    torch.manual_seed(seed)
    return task_obj.build_model(model_cfg).to(device)


def _fit(run: Run, device, ctx, *, state: dict | None = None, until_step: int | None = None,
         quiet: bool = False) -> Run:
    """Train `run` (train and resume), from `state` (None: from step 0), as one process of
    ctx's; the run's lock is held by the caller."""
    quiet = quiet or not ctx.main
    if not quiet:
        where = f"{ctx.world} processes ({ctx.strategy})" if ctx.world > 1 else device
        if state is None:
            print(f"run {run.dir}: {run.parameters():,} parameters on {where}")
        else:
            print(f"resuming {run.dir} at step {state['step']} of "
                  f"{run.train_config.max_steps}")
    run.model.train()
    run.state = fit(run.task, run.model, run.train_config, run.dir, state=state,
                    until_step=until_step, quiet=quiet)
    if ctx.world > 1:  # the sharded or wrapped model, back to one whole model per process
        run.model = _whole_model(run, device)
    return run


def check_fits(task_obj, model_cfg, device, *, training: bool, fix: str | None = None) -> None:
    """Refuse a model this machine cannot hold before allocating it: its parameters and
    buffers are counted on PyTorch's meta device (shapes, no memory), at 16 bytes a parameter
    to train (fp32 weights, gradients and AdamW's two moments) or 4 to run, against the
    device's memory (the CPU's: physical memory). Only the impossible is refused: a model
    that fits the total but not what is free now still starts."""
    try:
        with torch.device("meta"), weights_left_uninitialised():  # init on meta is slow:
            meta = task_obj.build_model(model_cfg)  # 1.3 s of SmolLM2's, for shapes alone
        params = sum(p.numel() for p in meta.parameters())
        need = params * (16 if training else 4) + sum(
            b.numel() * b.element_size() for b in meta.buffers())
    except Exception:  # a model that cannot be built on meta is checked by building it
        return
    device = torch.device(device)
    if device.type == "cuda":
        have = torch.cuda.get_device_properties(device).total_memory
    else:
        try:
            have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return
    if need > have:
        c = model_cfg
        where = "this GPU has" if device.type == "cuda" else "this machine has"
        raise ConfigError(f"the model needs {need / 1e9:,.1f} GB to "
                          f"{'train' if training else 'run'} ({params:,} parameters: "
                          f"d_model={c.d_model}, n_layer={c.n_layer}, context={c.context}, "
                          f"vocab_size={c.vocab_size}), more than the {have / 1e9:,.1f} GB of "
                          f"memory {where}; {fix or 'lower d_model, n_layer or context'}")


def _whole_model(run: Run, device) -> torch.nn.Module:
    """The model as `load` gives it: one whole copy per process, from the checkpoint just
    written (the wrapped or sharded training copy is dropped)."""
    return load(run.dir, device=str(device)).model


def _config_base(config: str | Path) -> dict:
    """A run's config.json as the base settings of a new run."""
    path = Path(config).expanduser()
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"--config {config}: no such file; give a run's config.json or its "
                          "folder")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {config} is not JSON ({e}); give a run's config.json") \
            from None
    if not isinstance(doc, dict) or "task" not in doc or "train" not in doc:
        raise ConfigError(f"--config {config} is not a monotile run's config.json (it has no "
                          "task and train settings)")
    return doc


def resume(run_dir: str | Path, *, quiet: bool = False, until_step: int | None = None,
           strategy: str | None = None, device: str | None = None) -> Run:
    """Continue a stopped run from its last checkpoint to its max_steps, on any number of
    processes (under torchrun, with `strategy` ddp or fsdp; default: the run's own), on
    `device` (default auto: whatever this machine has, whatever the run was trained on).
    A run stopped before its first checkpoint starts again from step 0, as `train` would
    have run it. The run is locked while it trains (one writer; readers are never blocked)."""
    distributed.setup(strategy or "auto")
    run_dir = check_run_dir(run_dir)
    main = distributed.is_main()
    with writer_lock(run_dir) if main else contextlib.nullcontext():
        if main:
            recover(run_dir)  # the writer finishes or drops a commit a crash interrupted
        distributed.barrier()
        if not (run_dir / "trainer_state.json").exists() and _never_checkpointed(run_dir):
            return _restart(run_dir, strategy=strategy, device=device, quiet=quiet,
                            until_step=until_step)
        ctx = distributed.current(strategy or read_config(run_dir)[2]["train"].strategy)
        # FSDP: a sharded checkpoint's weights are read by the trainer once it has sharded
        # the model, each process its own pieces, not whole into every process here
        run = _load(run_dir, "last", device, read_shards=not ctx.sharded)
        if strategy is not None:
            run.configs["train"] = dataclasses.replace(run.train_config, strategy=strategy)
        distributed.check(run.train_config, ctx, resuming=True)
        quiet = quiet or not ctx.main
        if run.train_config.ema > 0:  # training continues from the raw weights, not the average
            load_model_weights(run.model, run.dir / "model.safetensors")
        state = read_trainer_state(run.dir)
        if state["step"] >= run.train_config.max_steps:
            if ctx.sharded and sharded_folder(run.dir) is not None:
                load_sharded_model(run.model, run.dir)  # evaluated whole, as load gives it
            if not quiet:
                print(f"{run.dir} already finished at step {state['step']}; nothing to resume")
            run.state = dict(state, last_eval=run.evaluate(), interrupted=False)
            return run
        check_threads(state, quiet)
        device = next(run.model.parameters()).device
        _fit(run, device, ctx, state=state, until_step=until_step, quiet=quiet)
        if getattr(run.model, "lora", None) and ctx.main:  # a fine-tuning run's adapter file
            write_adapter(run.dir, run.train_config, run.state.get("step"))
        return run


def _never_checkpointed(run_dir: Path, doc: dict | None = None) -> bool:
    """A training run (not imported, merged, quantized or fine-tuned) killed between its
    config.json (`doc`, read here when not given) and its first checkpoint: no weights of
    its own yet."""
    doc = read_json(run_dir / CONFIG) if doc is None else doc
    made_from = ("imported", "merged", "quantized", "lora", "base")
    return isinstance(doc, dict) and not any(k in doc for k in made_from) and not any(
        (run_dir / name).exists() for name in ("model.safetensors", "ema.safetensors"))


def _restart(run_dir: Path, *, strategy, device, quiet, until_step) -> Run:
    """resume of a run that never reached its first checkpoint: train it from step 0 with the
    settings and files it has (what `train` had written before it was stopped)."""
    doc, meta, configs = read_config(run_dir)
    if strategy is not None:
        configs["train"] = dataclasses.replace(configs["train"], strategy=strategy)
    ctx = distributed.current(configs["train"].strategy)
    distributed.check(configs["train"], ctx)
    task_name = meta["task"]
    task = task_class(task_name).load(configs[task_name], configs["model"], run_dir)
    device = pick_device(device or "auto")
    check_fits(task, configs["model"], device, training=True)
    model = _fresh_model(task, configs["model"], configs["train"].seed, device)
    if ctx.main:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)  # lines of the stopped start
        if not quiet:
            print(f"{run_dir} stopped before its first checkpoint; starting it from step 0")
    run = Run(run_dir, meta, configs, task, model)
    return _fit(run, device, ctx, until_step=until_step, quiet=quiet)


def read_trainer_state(run_dir: Path) -> dict:
    """RUN/trainer_state.json, checked to be what the trainer wrote: a CheckpointError naming
    the file (and the restore-or-restart fix) for one that is damaged."""
    path = Path(run_dir) / "trainer_state.json"
    state = read_json(path)
    try:
        if not isinstance(state, dict):
            raise TypeError("not a JSON object")
        for key, kind in (("step", int), ("tokens", int), ("elapsed_s", (int, float)),
                          ("data_rng", str), ("torch_rng", str)):
            if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
                raise TypeError(f"{key} is {state.get(key)!r}")
        if state["step"] < 0:
            raise ValueError(f"step is {state['step']}")
        for key in ("data_rng", "torch_rng"):  # the generators' states, as saved
            probe = torch.Generator()
            probe.set_state(rng_from_str(state[key]))
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path} is damaged ({str(e).splitlines()[0][:120]}); restore it "
                              "from a backup, or start the run again") from None
    return state


def check_threads(state: dict, quiet: bool) -> None:
    """Warn when the run trained on another number of CPU threads: a reduction summed in
    another order differs in the last bits (2.4e-7 between 1 and 2 threads), so the resumed
    run is no longer bit-identical to an uninterrupted one (OMP_NUM_THREADS or --threads)."""
    was, now = state.get("threads"), torch.get_num_threads()
    if was is not None and was != now and not quiet:
        warnings.warn(f"this run trained on {was} CPU threads and resumes on {now}: it "
                      f"continues, but not bit-identically; --threads {was} (or "
                      f"OMP_NUM_THREADS={was}) resumes exactly", stacklevel=2)


def load(run_dir: str | Path, *, checkpoint: str = "last", device: str | None = None,
         dtype: str | None = None, compile: bool = False,
         before_weights: Callable[[Run], None] | None = None) -> Run:
    """A run directory's model and task. checkpoint: "last" (model.safetensors, or the sharded
    folder an FSDP run's trainer_state.json names, read here in one process) or "best".
    device: auto (the default: CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or mps. It is
    this machine's choice, not the run's: a run trained on a GPU loads on a laptop as it is.
    dtype: load for inference only, as optimize_for_inference(dtype) makes it; on the CPU
    each layer is converted as it is read, so the process never holds the float weights
    whole (an int4 SmolLM2 decodes in ~1/3 of the memory of loading, then converting).
    compile: a text generation run's decoding step compiled (optimize_for_inference; dtype
    float32 unless given). before_weights: called with the run once its task is read, before
    its model is built (run.model is None then) or any weight read: what needs the task alone
    done while the process is small (`monotile generate` encodes its prompt there)."""
    if compile and dtype is None:
        dtype = "float32"
    if dtype is not None:  # refused before any file is read
        _check_inference_dtype(dtype)
    return _load(run_dir, checkpoint, device, dtype=dtype, compile=compile,
                 before_weights=before_weights)


def _check_inference_dtype(dtype: str) -> None:
    from .infer import INFERENCE_DTYPES
    if dtype not in INFERENCE_DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid for inference: choose "
                          f"{', '.join(INFERENCE_DTYPES)}")


def _load(run_dir: str | Path, checkpoint: str, device: str | None, *,
          read_shards: bool = True, dtype: str | None = None, compile: bool = False,
          before_weights: Callable[[Run], None] | None = None) -> Run:
    """load; with read_shards False, a sharded checkpoint's weights are left unread (an FSDP
    resume reads them after sharding the model: trainer.fit, checkpoint.load_model_shards)."""
    run_dir = check_run_dir(run_dir)  # read, never repaired here: the writer does that
    doc, meta, configs = read_config(run_dir)
    task_name = meta["task"]
    task = task_class(task_name).load(configs[task_name], configs["model"], run_dir)
    weights = run_dir / weights_file(configs["train"], checkpoint)
    sharded = sharded_folder(run_dir, checkpoint)
    if sharded is None and not weights.exists() and \
            not (run_dir / "trainer_state.json").exists():
        pid = writer_pid(run_dir)
        if pid:
            raise CheckpointError(f"{run_dir} has no checkpoint yet: its training (pid {pid}) "
                                  "started moments ago; try again in a few seconds")
        if _never_checkpointed(run_dir, doc):
            raise CheckpointError(f"{run_dir} has no checkpoint: its training stopped before "
                                  f"the first one; `monotile resume {run_dir}` starts it")
        raise CheckpointError(f"{run_dir} has no weights ({weights.name}): the command that "
                              "made it stopped before writing them; delete the folder and "
                              "make it again")
    run = Run(run_dir, meta, configs, task, None)
    if before_weights is not None:
        before_weights(run)
    device = pick_device(device or "auto")
    check_fits(task, configs["model"], device, training=False,
               fix=f"is {run_dir / CONFIG} damaged? restore it")
    with weights_left_uninitialised():  # the checkpoint overwrites every weight
        run.model = model = task.build_model(configs["model"])
    if "lora" in doc:  # a fine-tuning run: the base's weights, then its own adapters
        from .core.lora import add_lora
        load_model_weights(model, base_weights(doc))
        lora = doc["lora"]
        add_lora(model, lora["rank"], lora["alpha"], lora["targets"])
    if doc.get("quantized"):  # int8 weights: the int8 layers first, then their values
        from .infer.quantize import quantize_int8
        quantize_int8(model)
    streamed = (dtype is not None and sharded is None and device.type == "cpu"
                and "lora" not in doc and not doc.get("quantized"))
    if streamed:  # each layer read as it is converted (infer/convert.py)
        from .infer.convert import release_free_memory
        with WeightReader(model, weights) as reader:
            run.optimize_for_inference(dtype, weights=reader, compile=compile)
        release_free_memory()  # what the reader's closing let go, back to the system
        return run
    if sharded is not None:
        if read_shards:
            load_sharded_model(model, run_dir, checkpoint)
    else:
        load_model_weights(model, weights)
    model.to(device).eval()
    return run if dtype is None else run.optimize_for_inference(dtype, compile=compile)


def consolidate(run_dir: str | Path, *, out: str | Path | None = None,
                checkpoint: str = "last") -> Path:
    """A run's sharded checkpoint (FSDP: each process's shards) as the usual safetensors files,
    put together in one process, which holds each tensor whole once. In place (`out` None):
    model.safetensors, optimizer.safetensors and best.safetensors replace the sharded folders,
    committed as any checkpoint (a crash leaves one or the other), and the run resumes, loads
    and exports as one trained by a single process. With `out`, a file: `checkpoint`'s
    weights alone (those of model.safetensors), and the run is left as it is."""
    from .train.optim import make_optimizer
    if distributed.launched():
        raise ConfigError("consolidate runs in one process; start it without torchrun")
    run_dir = check_run_dir(run_dir)
    if out is not None:
        out = Path(out)
        if out.is_dir() or not out.parent.is_dir():
            raise ConfigError(f"--out {out}: give a file name in an existing folder, e.g. "
                              f"{run_dir.name}.safetensors")
        run = load(run_dir, checkpoint=checkpoint, device="cpu")
        save_tensors(out, model_tensors(run.model), {"format": "pt"})
        return out
    with writer_lock(run_dir):
        recover(run_dir)
        last, best = sharded_folder(run_dir, "last"), sharded_folder(run_dir, "best")
        if last is None and best is None:
            return run_dir  # its checkpoint is safetensors files already
        run = load(run_dir, checkpoint="last", device="cpu")
        state = read_trainer_state(run_dir)
        cfg = run.train_config
        opt = make_optimizer(run.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             beta1=cfg.beta1, beta2=cfg.beta2)
        load_optimizer_state(run.model, opt, run_dir, state)
        if best is not None:
            scored = {"step": best.name.split("-")[1].split(".")[0],
                      run.task.best_metric[0]: str(state.get("best"))}
            best = (load(run_dir, checkpoint="best", device="cpu").model, scored)
        save_checkpoint(run_dir, run.model, opt, state, best=best)
        return run_dir
