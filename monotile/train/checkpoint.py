"""Checkpoints as safetensors, written so that a crash never leaves a broken run.

Every file is written to a temporary name, fsync'd and renamed over the old one (a rename is
atomic on POSIX). A resumable checkpoint is three files (model, optimizer, trainer state), so
they are first written whole into `.checkpoint.tmp/`, marked COMPLETE, and only then moved into
place; `recover` finishes a move that a crash interrupted, or drops an incomplete journal.
Nothing is ever unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import base64
import errno
import json
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from . import distributed

JOURNAL = ".checkpoint.tmp"
RESUME_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors",
                "trainer_state.json")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# a write that failed for want of room: the disk, the user's quota, or the file size limit
_FULL = {errno.ENOSPC: "No space left on device", errno.EDQUOT: "Disk quota exceeded",
         errno.EFBIG: "File too large"}


def disk_full(e: Exception, path: Path, size: int | None = None) -> CheckpointError | None:
    """The one-line error for a write of `path` that ran out of room (OSError ENOSPC, EDQUOT
    or EFBIG, or safetensors' own error wrapping one), naming the folder and the room it
    needs; None for any other failure."""
    if isinstance(e, OSError) and e.errno in _FULL:
        why = _FULL[e.errno]
    else:
        why = next((w for w in _FULL.values() if w in str(e)), None)
        if why is None:
            return None
    folder = path.parent.parent if path.parent.name == JOURNAL else path.parent
    try:
        free = f"{shutil.disk_usage(folder).free / 1e6:,.1f} MB free there"
    except OSError:
        free = "its free space unknown"
    need = f" ({size / 1e6:,.1f} MB)" if size else ""
    return CheckpointError(f"cannot write {path.name}{need} in {folder}: {why} ({free}); free "
                           "some space (or raise the quota) and run the command again; the "
                           "files written before are intact")


def atomic_write(path: Path, write, size: int | None = None) -> None:
    """write(tmp_path), fsync it, rename it to path. A disk that fills up midway leaves `path`
    as it was and raises disk_full's one-line CheckpointError (`size`: the bytes it needs)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, SafetensorError) as e:
        full = disk_full(e, path, size)
        if full is None:
            raise
        raise full from None
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = None):
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata), size)


def load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; CheckpointError if unreadable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; is this a monotile run directory?")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is corrupt "
                              "or truncated: restore it or retrain") from None


# ---- model weights ----------------------------------------------------------------------------

def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with tied weights saved once (the first name in state-dict order), and
    sharded (FSDP) tensors gathered whole: every process must call it, in the same order.
    A model with LoRA adapters (monotile.core.lora) saves the adapters alone."""
    out, seen = {}, set()
    adapters_only = bool(getattr(model, "lora", None))
    for name, t in model.state_dict().items():
        if adapters_only and ".lora_" not in name:
            continue
        key = (distributed.local_ptr(t), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = distributed.full_tensor(t)
    return out


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
                      "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _header(raw, path: Path) -> tuple[dict, dict[str, tuple[str, tuple, int, int]]]:
    """(metadata, name -> (dtype, shape, start, end)) of a safetensors file: a little-endian
    u64 n, an n-byte JSON header of {name: {dtype, shape, data_offsets}}, then the data. Each
    tensor's byte range is checked against its dtype, its shape and the file's size."""
    size = os.fstat(raw.fileno()).st_size
    raw.seek(0)
    n = int.from_bytes(raw.read(8), "little")
    if not 2 <= n <= size - 8:
        raise ValueError(f"a header of {n} bytes in a file of {size}")
    header = json.loads(raw.read(n))
    metadata = header.pop("__metadata__", None) or {}
    places = {}
    for name, entry in header.items():
        dtype, shape = entry["dtype"], tuple(int(d) for d in entry["shape"])
        begin, end = (8 + n + int(o) for o in entry["data_offsets"])
        if end > size or end - begin != math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize:
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        places[name] = (dtype, shape, begin, end)
    return metadata, places


def _read_into(raw, place: tuple[str, tuple, int, int], param: torch.Tensor) -> None:
    """Read a tensor's bytes from the file straight into `param`'s memory where it can (a
    contiguous CPU tensor of the file's dtype and size): no second copy of the weights, not
    even the file's pages mapped. Elsewhere (another dtype or device) it is read, then copied."""
    dtype, shape, start, end = place
    raw.seek(start)
    if (param.device.type == "cpu" and param.is_contiguous()
            and _SAFETENSORS_DTYPES[dtype] == param.dtype and start < end):
        target = memoryview(param.view(-1).view(torch.uint8).numpy())
        if raw.readinto(target) != end - start:
            raise ValueError("the file ended early")
        return
    data = bytearray(raw.read(end - start))
    if len(data) != end - start:
        raise ValueError("the file ended early")
    if data:
        param.copy_(torch.frombuffer(data, dtype=_SAFETENSORS_DTYPES[dtype]).view(shape))


def load_model_weights(model: nn.Module, path: Path) -> dict[str, str]:
    """Load weights into `model`, naming the first missing, unexpected or misshapen tensor.
    The file is opened once (a checkpoint committed meanwhile by a training process replaces
    it by rename: this reader keeps the file it opened) and its header checked first; then
    one tensor at a time is read into the model, so the process holds the model and at most
    one tensor of the file, not two copies of it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist; is this a monotile run directory?")
    expected = model_tensors(model)
    try:
        with torch.no_grad(), open(path, "rb") as raw:
            metadata, places = _header(raw, path)
            for name, t in expected.items():
                if name not in places:
                    raise CheckpointError(f"{path}: tensor {name!r} is missing; the checkpoint "
                                          "does not belong to this model configuration")
                if places[name][1] != tuple(t.shape):
                    raise CheckpointError(f"{path}: tensor {name!r} has shape "
                                          f"{places[name][1]}, the model expects "
                                          f"{tuple(t.shape)}; config.json and the weights "
                                          "disagree")
            extra = sorted(set(places) - set(expected))
            if extra:
                raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r}; the checkpoint "
                                      "does not belong to this model configuration")
            params = model.state_dict()
            for name, place in places.items():
                _read_into(raw, place, params[name])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); it is corrupt "
                              "or truncated: restore it or retrain") from None
    return metadata


# ---- optimizer and RNG state ------------------------------------------------------------------

def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Flatten optimizer.state_dict(): tensors as state.<param>.<key>, the rest as JSON."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for key, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = distributed.full_tensor(value)
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, path: Path) -> None:
    tensors, metadata = load_tensors(path)
    try:
        extra = json.loads(metadata["optimizer"])
        state: dict[int, dict] = {}
        for name, t in tensors.items():
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
        for name, value in extra["scalars"].items():
            idx, key = name.split(".", 1)
            state.setdefault(int(idx), {})[key] = value
        params = [p for group in opt.param_groups for p in group["params"]]
        for idx, st in state.items():  # whole moments cut to this process's shard (FSDP)
            for key, t in st.items():
                if torch.is_tensor(t) and idx < len(params):
                    st[key] = distributed.shard_like(t, params[idx])
        opt.load_state_dict({"state": state, "param_groups": extra["param_groups"]})
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not hold this run's optimizer state ({e}); "
                              "the run cannot be resumed exactly, start a new one") from None


def rng_to_str(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode()


def rng_from_str(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8).clone()


# ---- the resumable triple ---------------------------------------------------------------------

def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    state: dict, ema: nn.Module | None = None) -> None:
    """Write model, optimizer, trainer state (and the weights' moving average, if kept) as one
    unit (journal, COMPLETE mark, renames). With several processes every one of them calls this
    (sharded state is gathered), the main one writes, and all leave together."""
    run_dir = Path(run_dir)
    step = str(state["step"])
    weights = model_tensors(model)
    ema_weights = model_tensors(ema) if ema is not None else None
    opt_t, opt_meta = optimizer_tensors(opt)
    if distributed.is_main():
        journal = run_dir / JOURNAL
        shutil.rmtree(journal, ignore_errors=True)
        try:
            journal.mkdir()
            save_tensors(journal / "model.safetensors", weights, {"step": step, "format": "pt"})
            if ema_weights is not None:
                save_tensors(journal / "ema.safetensors", ema_weights,
                             {"step": step, "format": "pt"})
            save_tensors(journal / "optimizer.safetensors", opt_t,
                         {"step": step, "optimizer": json.dumps(opt_meta)})
            atomic_write_json(journal / "trainer_state.json", state)
            atomic_write_text(journal / "COMPLETE", step)
        except BaseException:  # the last committed checkpoint stays the run's state
            shutil.rmtree(journal, ignore_errors=True)
            raise
        _commit(run_dir)
    distributed.barrier()


def _commit(run_dir: Path) -> None:
    journal = run_dir / JOURNAL
    for name in RESUME_FILES:
        if (journal / name).exists():
            os.replace(journal / name, run_dir / name)
    _fsync_dir(run_dir)
    shutil.rmtree(journal, ignore_errors=True)


def recover(run_dir: Path) -> None:
    """Finish a checkpoint commit a crash interrupted, or discard an incomplete one. Only the
    run's writer calls it, holding the run's lock (rundir.writer_lock): a reader that did
    would pull the journal from under a training process."""
    journal = Path(run_dir) / JOURNAL
    if not journal.exists():
        return
    if (journal / "COMPLETE").exists():
        _commit(Path(run_dir))
    else:
        shutil.rmtree(journal, ignore_errors=True)


# ---- the metrics log ---------------------------------------------------------------------------

def read_metrics(run_dir: Path) -> list[dict]:
    """RUN/metrics.jsonl's records. A line that is not a whole JSON object (the last one, torn
    by a kill midway through its write, or being written right now) is left out."""
    path = Path(run_dir) / "metrics.jsonl"
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return []
    records = []
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step", 0), int):
            records.append(record)
    return records
