"""Training on several processes with PyTorch's own engine: torchrun starts them, this file joins
them, wraps the model, gives each process its shard of every batch, and reads and writes sharded
state: gathered whole (full_tensor), or each process its own pieces (save_shards, load_shards,
read back on any number of processes).

    torchrun --nproc-per-node N -m monotile train ... --strategy ddp|fsdp

The global batch is `batch_size` (as in a single process); rank r of W trains on rows
[r B/W, (r+1) B/W) of it. Every rank draws the same global batch from the same seeded generator
and keeps its rows, so a run's data does not depend on W and a run can resume on any W.

DDP (DistributedDataParallel): every rank holds the whole model; after backward the gradients
    are averaged, g = (1/W) sum_r g_r, so every rank takes the same AdamW step.
FSDP (FSDP2, `torch.distributed.fsdp.fully_shard`): every rank holds 1/W of each parameter,
    gradient and AdamW moment; a block's weights are all-gathered just before its forward and
    backward and freed after, and gradients are reduce-scattered (the same average, sharded).
Backends: NCCL on CUDA GPUs, gloo on CPU.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..core.transformer import Block
from ..errors import CheckpointError, ConfigError

STRATEGIES = ("auto", "ddp", "fsdp")


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank of world, and how the model is spread over them."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    strategy: str = "single"  # single | ddp | fsdp

    @property
    def main(self) -> bool:
        """Only the main process logs and writes files."""
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        """Whether each process holds only its shards of the model (FSDP on several)."""
        return self.strategy == "fsdp" and self.world > 1


def launched() -> bool:
    """Whether torchrun (or another launcher setting WORLD_SIZE) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(strategy: str = "auto") -> Context:
    """Join the process group torchrun describes in the environment (once), and say how the
    model will be spread: ddp or fsdp under torchrun ("auto" = ddp), a single process otherwise."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy={strategy!r} is invalid: choose {', '.join(STRATEGIES)}")
    if not launched():
        return Context()
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # NCCL for CUDA tensors, gloo for the few CPU ones (a stop flag, a path)
        dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo",
                                timeout=timedelta(minutes=30))
    return current(strategy)


def current(strategy: str = "auto") -> Context:
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(rank=dist.get_rank(), world=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   strategy="ddp" if strategy == "auto" else strategy)


def is_main() -> bool:
    return current().main


def barrier() -> None:
    if current().world > 1:
        dist.barrier()


def shutdown() -> None:
    """Leave the process group. gloo's worker threads drop a finished collective's tensors just
    after waking the caller, and need the GIL to do it; a process that reaches interpreter
    shutdown first kills such a thread inside a C++ destructor ("terminate called without an
    active exception", SIGABRT, pytorch#179291). A moment without the GIL lets them finish."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        time.sleep(0.05)


def broadcast(obj):
    """The main process's `obj` on every process (a path, a flag)."""
    if current().world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_sum(value: torch.Tensor) -> torch.Tensor:
    """sum over processes of a tensor (in place where distributed)."""
    if current().world > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def any_process(flag: bool) -> bool:
    """True on every process if it is True on any (e.g. Ctrl-C reached one of them)."""
    if current().world == 1:
        return flag
    return bool(all_sum(torch.tensor([int(flag)])).item())


def check(train_cfg, ctx: Context, *, resuming: bool = False) -> None:
    """Refuse, on every process alike and before anything is written, what this many
    processes cannot train: a batch that does not split evenly, FSDP with a moving average."""
    b = train_cfg.batch_size
    if b % ctx.world:
        fits = [w for w in range(1, b + 1) if b % w == 0][:8]
        fix = (f"resume it on one of {fits} processes" if resuming else
               f"use --set batch_size={ctx.world * max(1, round(b / ctx.world))} or run on one "
               f"of {fits} processes")
        raise ConfigError(f"batch_size={b} does not split evenly over {ctx.world} processes; "
                          f"{fix}")
    if ctx.world > 1 and ctx.strategy == "fsdp" and train_cfg.ema > 0:
        raise ConfigError("ema is not supported with --strategy fsdp (the average would need "
                          "its own shards); use --strategy ddp, or --set ema=0")


def shard(batch, ctx: Context):
    """This rank's rows of a global batch: every tensor is cut along its first dimension."""
    if ctx.world == 1:
        return batch
    if torch.is_tensor(batch):
        n = batch.size(0) // ctx.world
        return batch[ctx.rank * n:(ctx.rank + 1) * n]
    if isinstance(batch, dict):
        return {k: shard(v, ctx) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(shard(v, ctx) for v in batch)
    return batch


def wrap(model: nn.Module, ctx: Context) -> nn.Module:
    """The module to call for training: DDP around `model`, or `model` itself sharded in place
    by FSDP2 (each block a unit, then the rest), or `model` alone in a single process."""
    if ctx.world == 1:
        return model
    if ctx.strategy == "ddp":
        device = next(model.parameters()).device
        ids = [device.index] if device.type == "cuda" else None
        # gradients live in DDP's all-reduce buckets: no second copy of them. The trunk's
        # buffers (the RoPE table) are computed from the config, the same on every rank:
        # nothing to broadcast before each forward
        return nn.parallel.DistributedDataParallel(model, device_ids=ids,
                                                   gradient_as_bucket_view=True,
                                                   broadcast_buffers=False)
    from torch.distributed.fsdp import fully_shard
    for module in model.modules():
        if isinstance(module, Block):  # each of the trunk's blocks is one unit
            fully_shard(module)
    fully_shard(model)
    return model


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (DTensor) tensor gathered whole, one at a time, into the main process's CPU
    memory (the others keep only its shape, on the meta device); a plain tensor as it is.
    Every process must call it, in the same order."""
    if not is_dtensor(t):
        return t
    full = t.full_tensor()
    return full.cpu() if current().main else full.to("meta")


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether t is sharded (a DTensor). Importing torch.distributed.tensor takes ~1 s, and a
    DTensor can exist only once it is imported, so a process that never shards never pays it."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def local_ptr(t: torch.Tensor) -> int:
    return (t.to_local() if is_dtensor(t) else t).data_ptr()


def shard_like(full: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """`full` cut the way `param` is sharded, when param is a DTensor of full's shape."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    if isinstance(param, DTensor) and not isinstance(full, DTensor) and \
            tuple(full.shape) == tuple(param.shape):
        return distribute_tensor(full.to(param.to_local().device), param.device_mesh,
                                 param.placements)
    return full


# ---- sharded checkpoints (torch.distributed.checkpoint) ---------------------------------------

# DCP's safetensors writer builds each file in memory before it writes it: files of at most
# this many bytes of a process's pieces keep what a process holds while saving that small
FILE_BYTES = 2**26


def save_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Every process writes the pieces of `tensors` it holds into `folder` at once, nothing
    gathered: process r's DTensor shards, and its share of the plain tensors (each written
    once, by one process), go to shard-<r+1>-model-<i>-of-<n>.safetensors, each piece's
    offset in the tensor in the file's header; file i holds consecutive tensors, about
    FILE_BYTES of this process's pieces (file_numbers). DCP's safetensors writer: no pickle
    (its default writer pickles an index file). Every process must call it; a failure on any
    process raises on all of them."""
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.api import CheckpointException
    writer = HuggingFaceStorageWriter(str(folder), save_distributed=True,
                                      fqn_to_index_mapping=file_numbers(tensors))
    try:
        dcp_save(tensors, storage_writer=writer)
    except CheckpointException as e:  # the first process's own failure, not DCP's wrapper
        raise _first_failure(e) from None


def file_numbers(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """name -> file number 1, 2, ...: consecutive tensors, a new file once the whole tensors
    of this one pass W * FILE_BYTES (so about FILE_BYTES of each process's 1/W pieces). The
    same on every process: it reads only whole shapes."""
    budget, numbers, n, size = current().world * FILE_BYTES, {}, 1, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if size and size + nbytes > budget:
            n, size = n + 1, 0
        numbers[name] = n
        size += nbytes
    return numbers


def load_shards(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `tensors` in place from a folder that save_shards wrote on any number of
    processes: each tensor (or DTensor shard) is copied from the pieces that overlap it,
    so W processes read what W' wrote. Whole tensors are read by each process alone, no
    collective; DTensors by every process together. Each tensor is checked first to be
    there, of its shape and wholly covered by the pieces (a shard file lost, or a tensor
    the model lacks, is named)."""
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.api import CheckpointException
    folder = Path(folder)
    reader = HuggingFaceStorageReader(str(folder))
    try:
        if not any(f.suffix == ".safetensors" for f in folder.iterdir()):
            raise FileNotFoundError(f"no shard files in {folder}")
        metadata = reader.read_metadata()
        _check_shards(folder, metadata.state_dict_metadata, tensors)
        reader.read_metadata = lambda *args, **kwargs: metadata  # DCP reads what was checked
        alone = not any(is_dtensor(t) for t in tensors.values())
        with warnings.catch_warnings():  # DCP warns that a process reading alone reads alone
            warnings.filterwarnings("ignore", "torch.distributed is disabled")
            dcp_load(tensors, storage_reader=reader, no_dist=alone)
    except CheckpointException as e:
        e = _first_failure(e)
        raise CheckpointError(f"{folder} is not a readable sharded checkpoint ({e}); it is "
                              "damaged: restore it or retrain") from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{folder} is not a readable sharded checkpoint ({e}); it is "
                              "damaged: restore it or retrain") from None


def _check_shards(folder: Path, saved: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse, by name, a tensor missing from the shards or of another shape, a tensor of the
    shards' that `tensors` lacks (under the same first name, e.g. model.), and a tensor whose
    pieces do not cover all of it."""
    for name, t in tensors.items():
        md = saved.get(name)
        short = name.split(".", 1)[-1]
        if md is None:
            raise CheckpointError(f"{folder}: tensor {short!r} is missing; the checkpoint does "
                                  "not belong to this model configuration")
        if tuple(md.size) != tuple(t.shape):
            raise CheckpointError(f"{folder}: tensor {short!r} has shape {tuple(md.size)}, the "
                                  f"model expects {tuple(t.shape)}; config.json and the weights "
                                  "disagree")
        if sum(math.prod(c.sizes) for c in md.chunks) != math.prod(md.size):
            raise CheckpointError(f"{folder}: tensor {short!r} is not whole in the shard files "
                                  "(one is missing or damaged); restore the folder or retrain")
    prefixes = {name.split(".", 1)[0] for name in tensors}
    extra = sorted(n for n in saved if n.split(".", 1)[0] in prefixes and n not in tensors)
    if extra:
        raise CheckpointError(f"{folder}: unexpected tensor {extra[0].split('.', 1)[-1]!r}; the "
                              "checkpoint does not belong to this model configuration")


def _first_failure(e: BaseException) -> BaseException:
    """The exception behind DCP's CheckpointException (which gathers every process's)."""
    failures = getattr(e, "failures", None)
    return next(iter(failures.values()))[0] if failures else e


def clip_grad_norm_(params, max_norm: float) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / ||g||), ||g|| the norm of all of them together,
    over every shard (nn.utils.clip_grad_norm_ with the FSDP norm made whole first)."""
    from torch.distributed.tensor import DTensor
    grads = [p.grad for p in params if p.grad is not None]
    total = nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):  # the norm of the shards' partial sums, made whole
        total = total.full_tensor()
    nn.utils.clip_grads_with_norm_([p for p in params if p.grad is not None], max_norm, total)
    return total


# ---- what a strategy costs ------------------------------------------------------------------

def memory_per_process(model: nn.Module, strategy: str, world: int, *, batch: int,
                       context: int, bytes_per_value: int = 4,
                       activation_bytes: int | None = None) -> dict[str, float]:
    """Bytes one process holds while training `model` with AdamW (build it on the meta device
    for a size that does not fit here). N parameters, W processes, fp32 state:

        single, ddp: weights 4N + gradients 4N + AdamW moments 8N
        fsdp:        (4N + 4N + 8N) / W, plus whole weights gathered for computing: the
                     root unit (embeddings, head, final norm: gathered through the forward)
                     and the two largest blocks (the one computing, the one prefetched)
        activations: kept for backward, per token of the process's batch / W rows:
                     per block a = 8 d + 2 h (norm inputs and outputs, q, k, v, attention
                     output, the MLP's hidden before and after its nonlinearity; 8 d + 4 h for
                     SwiGLU) plus 2 V for the logits and their gradient (an estimate: the rest
                     are exact counts). With activation checkpointing of r = L // k blocks:
                     (L - r + 1) a + r d: the others' activations, each recomputed block's
                     input, and one recomputed block's activations while its backward runs.
    `activation_bytes` per activation value (2 under bf16 autocast) defaults to
    `bytes_per_value`."""
    if strategy not in ("single", "ddp", "fsdp"):
        raise ConfigError(f"strategy={strategy!r} is invalid: choose single, ddp or fsdp")
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    blocks = [sum(p.numel() for p in m.parameters()) for m in model.modules()
              if isinstance(m, Block)]
    cfg = getattr(getattr(model, "trunk", None), "cfg", None)
    w = world if strategy == "fsdp" else 1
    out = {"parameters": n, "weights": bytes_per_value * n / w,
           "gradients": bytes_per_value * n / w, "adamw_moments": 2 * bytes_per_value * n / w}
    root = n - sum(blocks)  # what FSDP shards as the model's own unit
    out["gathered"] = (bytes_per_value * (root + sum(sorted(blocks)[-2:]))
                       if strategy == "fsdp" and world > 1 else 0)
    tokens = batch / (world if strategy != "single" else 1) * context
    if cfg is not None:
        from ..core.transformer import recomputed_blocks
        per_block = 8 * cfg.d_model + (4 if cfg.mlp == "swiglu" else 2) * cfg.hidden
        r = recomputed_blocks(cfg)
        held = cfg.n_layer - r + (1 if r else 0)  # blocks whose activations are held at once
        per_token = held * per_block + r * cfg.d_model + 2 * cfg.vocab_size
        out["activations"] = (activation_bytes or bytes_per_value) * tokens * per_token
    else:
        out["activations"] = float("nan")
    out["total"] = sum(v for k, v in out.items() if k != "parameters" and v == v)
    return out


def strategy_table(model: nn.Module, worlds=(1, 2, 8), *, batch: int, context: int) -> str:
    """A markdown table of memory_per_process for single, ddp and fsdp at `worlds` processes,
    in GB (10^9 bytes); docs/scaling.md prints it."""
    rows = ["| strategy | processes | weights | gradients | AdamW moments | gathered "
            "| activations | total |", "|---|---|---|---|---|---|---|---|"]
    for strategy in ("single", "ddp", "fsdp"):
        for world in ((1,) if strategy == "single" else worlds[1:]):
            m = memory_per_process(model, strategy, world, batch=batch, context=context)
            cells = [m[k] / 1e9 for k in ("weights", "gradients", "adamw_moments",
                                          "gathered", "activations", "total")]
            rows.append(f"| {strategy} | {world} | " + " | ".join(f"{c:.2f}" for c in cells)
                        + " |")
    return "\n".join(rows)
