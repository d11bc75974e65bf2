"""One training loop for every Task.

Each step: for each of `grad_accum` micro-batches, loss = task.loss(model, batch) / grad_accum
and backward; clip the global gradient norm to `grad_clip`; set lr(step); AdamW step. Every
`eval_interval` steps the task evaluates and the run saves best and last checkpoints. The loop
knows nothing about modalities: it talks to the Task (see monotile/modalities/__init__.py).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..errors import ConfigError, MonotileError, check_positive, invalid
from . import distributed
from .checkpoint import (atomic_write_text, disk_full, load_model_shards, load_model_weights,
                         load_optimizer_state, read_metrics, rng_from_str, rng_to_str,
                         save_checkpoint)
from .ema import EMA
from .optim import lr_at, make_optimizer
from .plots import plot_loss_curve


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    max_steps: int = 2000
    batch_size: int = 12
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    decay_steps: int | None = None   # None: decay over max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0           # 0 disables clipping
    ema: float = 0.0                 # decay of a moving average of the weights, e.g. 0.999;
                                     # 0 = off. When on, evaluation and `load` use the average
    eval_interval: int = 500
    log_interval: int = 10
    checkpoint_interval: int | None = None  # None: checkpoint at every evaluation
    seed: int = 1337
    device: str = "auto"             # auto | cpu | cuda | cuda:N | mps
    dtype: str = "auto"              # auto (bf16 autocast on CUDA GPUs that have it, else fp32)
                                     # | float32 | bfloat16 (fast on CPUs with AVX512-BF16/AMX)
    compile: bool = False
    strategy: str = "auto"           # under torchrun: ddp | fsdp (auto = ddp); ignored otherwise

    def __post_init__(self):
        check_positive(self, ("max_steps", "batch_size", "grad_accum", "eval_interval",
                              "log_interval"))
        if not self.lr > 0:
            invalid(self, "lr", "the learning rate must be > 0, e.g. --set lr=1e-3")
        if not 0 <= self.min_lr <= self.lr:
            invalid(self, "min_lr", f"it must be between 0 and lr={self.lr}")
        if self.warmup_steps < 0:
            invalid(self, "warmup_steps", "it must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= 0:
            invalid(self, "decay_steps", "it must be a positive integer")
        if self.weight_decay < 0 or self.grad_clip < 0:
            invalid(self, "weight_decay" if self.weight_decay < 0 else "grad_clip",
                    "it must be >= 0")
        for name in ("beta1", "beta2", "ema"):
            if not 0 <= getattr(self, name) < 1:
                invalid(self, name, "it must be in [0, 1)")
        if self.checkpoint_interval is not None and self.checkpoint_interval <= 0:
            invalid(self, "checkpoint_interval", "it must be a positive integer")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            invalid(self, "dtype", "choose auto, float32 or bfloat16")
        if not (self.device in ("auto", "cpu", "cuda", "mps") or self.device.startswith("cuda:")):
            invalid(self, "device", "choose auto, cpu, cuda, cuda:N or mps")
        if self.strategy not in distributed.STRATEGIES:
            invalid(self, "strategy", "choose auto, ddp or fsdp")


def pick_device(name: str) -> torch.device:
    """auto: cuda, then mps, then cpu. Under torchrun, "cuda" is this process's GPU."""
    if name in ("auto", "cuda") and torch.cuda.is_available() and distributed.launched():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={name!r} but CUDA is not available here; use --device cpu "
                          "(or --device auto)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device='mps' but this machine has no Apple GPU (MPS); use --device "
                          "cpu (or --device auto)")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX); elsewhere PyTorch emulates
    bf16 and it runs slower than fp32."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None),
              getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast where the device runs it fast (CUDA with bf16 support); None = fp32.
    On CPU auto stays fp32, as nanoGPT does: bf16 is opt-in (`--set dtype=bfloat16`)."""
    if name == "float32":
        return None
    if name == "bfloat16":
        if device.type == "cpu" and not cpu_has_bf16():
            warnings.warn("dtype=bfloat16 on a CPU without AVX512-BF16 or AMX: PyTorch emulates "
                          "bf16 here and trains slower than fp32; use --set dtype=float32",
                          stacklevel=2)
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def to_device(batch, device: torch.device):
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class _DeferredInterrupt:
    """Turn Ctrl-C into a flag checked between steps, so the run stops on a whole step and
    checkpoints it. A second Ctrl-C interrupts at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


def format_metrics(metrics: dict) -> str:
    """"accuracy 0.9944, loss 0.1052, test_images 360": floats to 4 places, counts as counts."""
    return ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in metrics.items() if isinstance(v, (int, float)))


def _append_metrics(run_dir: Path, record: dict) -> None:
    path = run_dir / "metrics.jsonl"
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise (disk_full(e, path) or e) from None


def truncate_metrics(run_dir: Path, step: int) -> None:
    """Drop metric lines logged after `step` (written before a crash, redone on resume) and
    any torn line a kill left, rewriting the file atomically (a kill now leaves either)."""
    if not (run_dir / "metrics.jsonl").exists():
        return
    keep = [r for r in read_metrics(run_dir) if r.get("step", 0) <= step]
    atomic_write_text(run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in keep))


def fit(task, model: nn.Module, cfg: TrainConfig, run_dir: Path, *, state: dict | None = None,
        until_step: int | None = None, quiet: bool = False) -> dict:
    """Train `model` on `task` from `state` (None: from scratch) to cfg.max_steps, or to
    `until_step` if given. Returns the trainer state; checkpoints live in `run_dir`."""
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    amp = autocast_dtype(cfg.dtype, device)
    ctx = distributed.current(cfg.strategy)  # train and resume checked it before writing
    quiet = quiet or not ctx.main
    data_rng = torch.Generator().manual_seed(cfg.seed)
    ema = EMA(model, cfg.ema) if cfg.ema > 0 else None
    train_model = distributed.wrap(model, ctx)  # FSDP shards `model` itself, in place
    if state is not None and ctx.sharded:  # each process reads the pieces of its own shards
        load_model_shards(model, run_dir, state)
    opt = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                         beta1=cfg.beta1, beta2=cfg.beta2)
    if state is None:
        state = {"step": 0, "best": None, "tokens": 0, "elapsed_s": 0.0}
    else:
        load_optimizer_state(model, opt, run_dir, state)  # a file, or FSDP's shards
        if ema is not None:
            load_model_weights(ema.model, run_dir / "ema.safetensors")
        data_rng.set_state(rng_from_str(state["data_rng"]))
        torch.set_rng_state(rng_from_str(state["torch_rng"]))
        if torch.cuda.is_available() and state.get("cuda_rng"):
            torch.cuda.set_rng_state(rng_from_str(state["cuda_rng"]), device=device)
        if ctx.main:
            truncate_metrics(run_dir, state["step"])
    end = min(cfg.max_steps, until_step) if until_step is not None else cfg.max_steps
    decay_steps = cfg.decay_steps or cfg.max_steps
    metric, mode = task.best_metric
    forward_model = torch.compile(train_model) if cfg.compile else train_model
    batches = rank_batches(task, data_rng, cfg.batch_size, ctx)

    def snapshot() -> dict:
        s = dict(state, data_rng=rng_to_str(data_rng.get_state()),
                 torch_rng=rng_to_str(torch.get_rng_state()),
                 threads=torch.get_num_threads())  # resume warns when it runs on others
        if device.type == "cuda":
            s["cuda_rng"] = rng_to_str(torch.cuda.get_rng_state(device))
        return s

    best_due: list = []  # the weights and scores of an evaluation that was the best

    def checkpoint():  # with the best weights, when this step's evaluation was the best
        save_checkpoint(run_dir, model, opt, snapshot(), ema=ema.model if ema else None,
                        best=best_due.pop() if best_due else None)

    def evaluate(step: int):
        evaluated = model if ema is None else ema.model  # the weights a user will get
        evaluated.eval()
        with _autocast(device, amp):  # every process evaluates (FSDP needs all of them)
            results = task.evaluate(evaluated)
        results = distributed.broadcast(results)  # all decide alike whether this is the best
        model.train()
        if ctx.main:
            _append_metrics(run_dir, {"step": step, "eval": results})
            plot_loss_curve(run_dir, metric)  # up to date while a long run goes on
        value = results.get(metric)
        best = state["best"]
        if value is not None and math.isfinite(value) and (
                best is None or (value < best if mode == "min" else value > best)):
            state["best"] = value  # saved by the checkpoint that follows every evaluation
            best_due[:] = [(evaluated, {"step": str(step), metric: str(value)})]
        return results

    if state["step"] == 0:
        checkpoint()  # a run killed before its first interval can still be resumed
    model.train()
    bar = tqdm(total=end, initial=state["step"], disable=quiet, dynamic_ncols=True,
               desc="train", unit="step")
    t_last, tokens_last = time.perf_counter(), state["tokens"]
    t_start = time.perf_counter() - state["elapsed_s"]
    last_eval: dict = {}
    interrupted = False
    with _DeferredInterrupt() as stop, _closing(bar):
        while state["step"] < end:
            step = state["step"]
            lr = lr_at(step, lr=cfg.lr, min_lr=cfg.min_lr, warmup=cfg.warmup_steps,
                       decay_steps=decay_steps)
            for group in opt.param_groups:
                group["lr"] = lr
            loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
            for micro in range(cfg.grad_accum):
                batch = to_device(next(batches), device)
                # DDP averages gradients once per step, after the last micro-batch (nanoGPT)
                last = micro == cfg.grad_accum - 1
                no_sync = getattr(train_model, "no_sync", None)
                with (no_sync() if no_sync is not None and not last
                      else contextlib.nullcontext()):
                    with _autocast(device, amp):
                        loss = task.loss(forward_model, batch) / cfg.grad_accum
                    loss.backward()
                loss_sum += loss.detach()
                state["tokens"] += task.tokens(batch) * ctx.world
            if cfg.grad_clip > 0:
                if ctx.sharded:
                    distributed.clip_grad_norm_(list(model.parameters()), cfg.grad_clip)
                else:
                    nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(model, step)
            state["step"] = step = step + 1
            state["elapsed_s"] = time.perf_counter() - t_start
            bar.update(1)

            if step % cfg.log_interval == 0 or step == end:
                # the one host sync per log interval; the mean over processes
                loss_sum = distributed.all_sum(loss_sum).item() / ctx.world
                if not math.isfinite(loss_sum):
                    raise MonotileError(
                        f"the loss became {loss_sum} by step {step}: training diverged; lower "
                        f"lr (now {cfg.lr}) or raise warmup_steps, and train again")
                now = time.perf_counter()
                tok_s = (state["tokens"] - tokens_last) / max(now - t_last, 1e-9)
                if ctx.main:
                    _append_metrics(run_dir, {"step": step, "loss": loss_sum, "lr": lr,
                                              "tokens_per_s": tok_s,
                                              "elapsed_s": state["elapsed_s"]})
                bar.set_postfix(loss=f"{loss_sum:.4f}", tok_s=f"{tok_s:,.0f}")
                t_last, tokens_last = now, state["tokens"]
            done = step == cfg.max_steps
            requested = stop.requested
            if ctx.world > 1:  # all processes stop on the same step: they agree at log steps
                logged = step % cfg.log_interval == 0 or step == end
                requested = logged and distributed.any_process(stop.requested)
            if step % cfg.eval_interval == 0 or done:
                last_eval = evaluate(step)
                if not quiet:
                    bar.write(f"step {step}: {format_metrics(last_eval)}")
            if (done or step == end or requested or step % cfg.eval_interval == 0
                    or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0)):
                checkpoint()
            if requested:
                interrupted = True
                break
    if ctx.main:
        plot_loss_curve(run_dir, metric)
    state["interrupted"] = interrupted
    state["last_eval"] = last_eval
    return state


def rank_batches(task, rng: torch.Generator, batch_size: int, ctx):
    """This process's rows of each global training batch: the task makes only those when its
    `batches` takes `rows` (token shards read no other rows), else distributed.shard cuts
    them from the whole batch. Either way every process draws the same global batch."""
    import inspect
    if ctx.world > 1 and "rows" in inspect.signature(task.batches).parameters:
        n = batch_size // ctx.world
        yield from task.batches("train", rng, batch_size,
                                rows=slice(ctx.rank * n, (ctx.rank + 1) * n))
        return
    for batch in task.batches("train", rng, batch_size):
        yield distributed.shard(batch, ctx)


@contextlib.contextmanager
def _closing(bar):
    """Close the progress bar however the loop ends, so an error prints on its own line."""
    try:
        yield bar
    finally:
        bar.close()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
