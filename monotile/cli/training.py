"""The verbs that train: train, resume, finetune, merge, quantize and scaling."""

from __future__ import annotations

import sys

from ..errors import MonotileError
from .common import emit, finish, print_json, stop_at

# Flags kept as aliases of `--set NAME=VALUE`, the one way to set a setting; they apply to the
# tasks whose config has the setting (speech: holdout_speaker; series: target, time_col,
# horizon), and --help says what they stand for.
ALIASES = (("holdout_speaker", "NAME"), ("target", "COL[,COL...]"), ("time_col", "COL"),
           ("horizon", "H"))


def _distributed_flags(p) -> None:
    p.add_argument("--strategy", choices=["ddp", "fsdp"], help="under torchrun: replicate the "
                   "model on every process (ddp, the default) or shard it (fsdp)")
    p.add_argument("--stop-at", type=int, metavar="STEP", help="stop after this step, "
                   "checkpointed; `monotile resume RUN` continues")


# ---- train --------------------------------------------------------------------------------------

def train(sub) -> None:
    from ..modalities import TASKS, is_trainable
    tasks = [name for name, cls in TASKS.items() if is_trainable(cls)]
    p = sub.add_parser("train", help="train a model from a preset into a run directory")
    p.add_argument("task", nargs="?", help=", ".join(tasks[:-1]) + f" or {tasks[-1]} "
                   "(with --config: the config's)")
    p.add_argument("--preset", help="a named recipe, e.g. shakespeare-char (monotile presets)")
    p.add_argument("--config", metavar="RUN/config.json", help="start from a run's settings "
                   "instead of a preset (--set changes them); what the run filled from its "
                   "data is filled again from this data")
    p.add_argument("--data", help="data to use instead of the preset's: a text file or a "
                   "folder of token shards (monotile prepare text); an .npz, "
                   "a folder of class folders or a CSV of path,label of images; a manifest of "
                   "path,transcript or a LibriSpeech-style folder of recordings; a CSV of "
                   "series")
    p.add_argument("--out", help="the run directory to create (default runs/<preset>)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   dest="overrides",
                   help="override settings by name, e.g. --set max_steps=500 lr=3e-4 "
                   "(monotile presets --json lists them)")
    for name, metavar in ALIASES:
        p.add_argument("--" + name.replace("_", "-"), metavar=metavar, dest=f"alias_{name}",
                       help=f"the same as --set {name}={metavar}")
    p.add_argument("--sample", type=int, default=0, metavar="N",
                   help="after training, print N generated tokens (text)")
    _distributed_flags(p)
    finish(p, _train, json="print the final figures as JSON", quiet=True, machine=True)


def _train(a) -> None:
    from ..modalities import task_class
    from ..run import parse_overrides
    from ..run import train as train_run
    overrides = parse_overrides(a.overrides)
    task = a.task
    if task is None and a.config is not None:
        from ..run import _config_base
        task = _config_base(a.config)["task"]
    if task is None:
        raise MonotileError("give the task to train (monotile train TASK --preset NAME), or a "
                            "run's settings with --config RUN/config.json")
    fields = set(task_class(task).Config.__dataclass_fields__)
    for name, _ in ALIASES:
        value = getattr(a, f"alias_{name}")
        if value is not None:
            if name not in fields:
                raise MonotileError(f"--{name.replace('_', '-')} does not apply to {task} "
                                    f"runs (their config has no {name})")
            overrides[name] = str(value)
    if a.strategy:
        overrides["strategy"] = a.strategy
    if a.device != "auto":  # the same as --set device=...
        overrides["device"] = a.device
    run = train_run(a.task, a.preset, out=a.out, data=a.data, overrides=overrides,
                    quiet=a.quiet or a.json, until_step=stop_at(a), config=a.config)
    from ..train.distributed import is_main
    if not is_main():  # under torchrun only the main process reports
        return
    code = report_training(run, a)
    if a.sample and not a.json and "completions" in run.task.routes and not code:
        print(f"--- sample ({a.sample} tokens, temperature 0.8, seed 0) ---")
        print(run.generate("\n", max_new_tokens=a.sample, temperature=0.8, seed=0))
    return code


def report_training(run, a) -> int:
    """Print where the run stands; the exit status: 130 (as shells expect of Ctrl-C) when
    the user stopped it, else 0."""
    figures = {"run": str(run.dir), "step": run.state["step"],
               "interrupted": run.state.get("interrupted", False),
               "train_seconds": round(run.state["elapsed_s"], 1), **run.state.get("last_eval", {})}
    if a.json:
        print_json(figures)
    elif figures["interrupted"] or figures["step"] < run.train_config.max_steps:
        how = " (Ctrl-C), checkpointed" if figures["interrupted"] else ""
        print(f"stopped at step {figures['step']}{how}; continue with: monotile resume "
              f"{run.dir}")
    else:
        from ..train.trainer import format_metrics
        print(f"done: {run.dir} at step {figures['step']} in {figures['train_seconds']} s; "
              f"{format_metrics(run.state.get('last_eval', {}))}")
    return 130 if figures["interrupted"] else 0


# ---- resume -------------------------------------------------------------------------------------

def resume(sub) -> None:
    p = sub.add_parser("resume", help="continue a stopped run from its last checkpoint")
    p.add_argument("run")
    _distributed_flags(p)
    finish(p, _resume, json="print the final figures as JSON", quiet=True, machine=True)


def _resume(a) -> None:
    from ..run import resume as resume_run
    from ..train.distributed import is_main
    run = resume_run(a.run, quiet=a.quiet or a.json, until_step=stop_at(a), strategy=a.strategy,
                     device=a.device)
    if is_main():
        if getattr(run.model, "lora", None):  # the adapter file resume rewrote, as PEFT's too
            from ..interop.peft import write_peft_beside
            write_peft_beside(run.dir)
        return report_training(run, a)


# ---- finetune, merge, quantize ------------------------------------------------------------------

def finetune(sub) -> None:
    p = sub.add_parser("finetune", help="train LoRA adapters of a run on other data of its task")
    p.add_argument("run", help="the base run (it stays as it is)")
    p.add_argument("--data", required=True, help="the data to adapt to, as `train --data` takes "
                   "it for the run's task")
    p.add_argument("--out", help="the run directory to create (default runs/<base>-lora)")
    p.add_argument("--lora-rank", type=int, default=8, metavar="R")
    p.add_argument("--lora-alpha", type=float, default=None, metavar="A",
                   help="the adapter's scale is A / R (default A = R)")
    p.add_argument("--lora-targets", default=None, metavar="NAMES",
                   help="comma-separated linear layers to adapt (default: every linear layer "
                   "of the blocks; q,v is the LoRA paper's choice)")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   dest="overrides",
                   help="training and data settings, e.g. --set max_steps=500 lr=1e-3")
    p.add_argument("--stop-at", type=int, metavar="STEP")
    finish(p, _finetune, checkpoint="which weights of the base run to adapt", json=True,
           quiet=True, machine=True)


def _finetune(a) -> None:
    from ..adapt import finetune as finetune_run
    from ..run import parse_overrides
    targets = [t.strip() for t in a.lora_targets.split(",") if t.strip()] \
        if a.lora_targets else None
    run = finetune_run(a.run, a.data, rank=a.lora_rank, alpha=a.lora_alpha, targets=targets,
                       out=a.out, overrides=parse_overrides(a.overrides),
                       checkpoint=a.checkpoint, quiet=a.quiet or a.json, until_step=stop_at(a),
                       device=a.device)
    if a.json:
        print_json({"run": str(run.dir), "step": run.state["step"],
                    "trainable_parameters": run.state["trainable_parameters"],
                    "parameters": run.parameters(), "before": run.state["base_eval"],
                    **run.state.get("last_eval", {})})
        return 130 if run.state.get("interrupted") else 0
    from ..train.trainer import format_metrics
    print(f"before (the base model): {format_metrics(run.state['base_eval'])}")
    code = report_training(run, a)
    print(f"adapter: {run.dir / 'adapter.safetensors'} "
          f"({(run.dir / 'adapter.safetensors').stat().st_size / 1e3:,.0f} kB)")
    return code


def merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base run's weights")
    p.add_argument("run", help="the base run")
    p.add_argument("adapter", help="a fine-tuning run, or its adapter.safetensors")
    p.add_argument("--out", required=True, help="the merged run directory to create")
    p.add_argument("--checkpoint", default=None, choices=["last", "best"],
                   help="the base's weights (default: those the adapter was trained on)")
    finish(p, _merge, json=True)


def _merge(a) -> None:
    from ..adapt import merge as merge_runs
    run = merge_runs(a.run, a.adapter, out=a.out, checkpoint=a.checkpoint)
    emit(a, {"run": str(run.dir), "parameters": run.parameters()},
         f"merged: {run.dir} ({run.parameters():,} parameters)")


def quantize(sub) -> None:
    p = sub.add_parser("quantize", help="a copy of a run with int8 weights, for inference")
    p.add_argument("run")
    p.add_argument("--int8", action="store_true", required=True,
                   help="weight-only int8, one scale per output channel")
    p.add_argument("--out", required=True, help="the quantized run directory to create")
    finish(p, _quantize, checkpoint=True, json=True)


def _quantize(a) -> None:
    from ..adapt import quantize_run
    f = quantize_run(a.run, a.out, checkpoint=a.checkpoint)
    emit(a, f, f"quantized: {f['run']}, {f['layers']} layers int8, weights "
               f"{f['bytes_before'] / 1e6:,.2f} MB -> {f['bytes_after'] / 1e6:,.2f} MB")


# ---- scaling ------------------------------------------------------------------------------------

def scaling(sub) -> None:
    p = sub.add_parser("scaling", help="train a grid of sizes and lengths, fit L(N, D) = "
                       "E + A/N^alpha + B/D^beta, predict a larger model and check it")
    p.add_argument("--task", default="text", choices=["text"])
    p.add_argument("--preset", default="speeches-bpe")
    p.add_argument("--sizes", default="32,48,64,96", help="model widths (d_model), "
                   "comma-separated")
    p.add_argument("--tokens", default="250k,500k,1M", help="training tokens per run, "
                   "comma-separated (k, M suffixes)")
    p.add_argument("--predict", type=int, default=128, help="a larger width to predict, "
                   "then train on the largest budget (0: none)")
    p.add_argument("--out", default="runs/scaling", help="folder of the runs, the fit and "
                   "the plot (finished runs in it are reused)")
    p.add_argument("--data", help="another text file to train on")
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   dest="overrides",
                   help="settings for every run of the sweep")
    finish(p, _scaling, json=True)


def _scaling(a) -> None:
    from ..run import parse_overrides
    from ..scaling import parse_tokens, sweep
    try:
        sizes = [int(x) for x in a.sizes.split(",") if x.strip()]
    except ValueError:
        raise MonotileError(f"--sizes {a.sizes!r} is not a list of widths; write e.g. "
                            "64,96,128") from None
    tokens = [parse_tokens(x) for x in a.tokens.split(",") if x.strip()]
    say = (lambda line: None) if a.json else (lambda line: print(line, file=sys.stderr))
    r = sweep(a.preset, sizes=sizes, tokens=tokens, predict=a.predict or None, out=a.out,
              data=a.data, overrides=parse_overrides(a.overrides), progress=say)
    if a.json:
        print_json(r)
        return
    print(f"{'d_model':>8} {'N (trunk)':>11} {'D (tokens)':>12} {'val loss':>9}")
    for row in r["runs"]:
        print(f"{row['d_model']:>8} {row['N']:>11,} {row['D']:>12,} {row['val_loss']:>9.4f}")
    f = r["fit"]
    print(f"fit: L(N, D) = {f['E']:.3f} + {f['A']:.4g} / N^{f['alpha']:.3f} + "
          f"{f['B']:.4g} / D^{f['beta']:.3f}")
    if "prediction" in r:
        p = r["prediction"]
        print(f"d_model {p['d_model']} (N = {p['N']:,}) on {p['D']:,} tokens: predicted "
              f"{p['predicted']:.4f}, measured {p['measured']:.4f} ({p['error']:+.1%})")
    print(f"plot: {r['plot']}")
