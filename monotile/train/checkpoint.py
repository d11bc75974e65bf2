"""Checkpoints as safetensors, written so that a crash never leaves a broken run.

Every file is written to a temporary name, fsync'd and renamed over the old one (a rename is
atomic on POSIX). A resumable checkpoint is several files (model, optimizer, trainer state, the
best weights when this evaluation was the best), so they are first written whole into
`.checkpoint.tmp/`, marked COMPLETE, and only then moved into place; `recover` finishes a move
that a crash interrupted, or drops an incomplete journal.

A sharded model (FSDP) is not gathered: every process writes its own shards, in parallel, into
a new folder of the journal, RUN/checkpoint-<step>/ (and RUN/best-<step>/, the weights alone),
and trainer_state.json, moved in last, names the folders ("checkpoint", "best_checkpoint"):
committed folders never change, and the ones no longer named are removed after the commit.
Nothing is ever unpickled: tensors come from safetensors, everything else from JSON.
"""

from __future__ import annotations

import base64
import errno
import json
import math
import mmap
import os
import re
import shutil
import weakref
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import CheckpointError
from . import distributed

JOURNAL = ".checkpoint.tmp"
# moved from the journal in this order: trainer_state.json, which names what is current, last
RESUME_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors",
                "best.safetensors", "trainer_state.json")
SHARDED = re.compile(r"(checkpoint|best)-\d+(\.\d+)?")  # a sharded checkpoint's folder


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

def model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint holds, as the model holds them (FSDP: this process's shards):
    the state dict with tied weights once (the first name in state-dict order); a model with
    LoRA adapters (monotile.core.lora) saves the adapters alone."""
    out, seen = {}, set()
    adapters_only = bool(getattr(model, "lora", None))
    for name, t in model.state_dict().items():
        if adapters_only and ".lora_" not in name:
            continue
        key = (distributed.local_ptr(t), t.shape, t.stride()) if t.numel() else None
        if key is not None and key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def model_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """model_state with sharded (FSDP) tensors gathered whole into the main process: every
    process must call it, in the same order."""
    return {name: distributed.full_tensor(t) for name, t in model_state(model).items()}


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
    with WeightReader(model, path) as weights:
        weights.read_rest()
        return weights.metadata


class WeightReader:
    """A model's safetensors file, read into the model tensor by tensor when asked: the
    header is checked against the model first (every tensor there, of its shape, and no
    other), then `read_module` fills one module's tensors, `mapped` lends one tensor straight
    from the file's pages (only the pages touched become resident: an embedding table's rows
    as tokens look them up), and `read_rest` fills whatever is left. A model loaded for
    inference converts each layer as soon as it is read (infer/convert.py), so the float
    weights are never all in memory at once. A context manager: leaving it closes the file
    (mapped tensors keep their own mapping)."""

    def __init__(self, model: nn.Module, path: Path):
        self.path = path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path} does not exist; is this a monotile run directory?")
        self.expected = model_tensors(model)  # what the file must hold (FSDP: gathered)
        self.targets = model.state_dict()  # where it goes (views of the model's tensors)
        self.raw = open(path, "rb")
        self.done: set[str] = set()
        self.map = None
        self.kept: list[list[int]] = []  # keep_only's spans of the map, never let go after
        try:
            self.metadata, self.places = _header(self.raw, path)
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.close()
            raise self._unreadable(e) from None
        for name, t in self.expected.items():
            if name not in self.places:
                self.close()
                raise CheckpointError(f"{path}: tensor {name!r} is missing; the checkpoint "
                                      "does not belong to this model configuration")
            if self.places[name][1] != tuple(t.shape):
                self.close()
                raise CheckpointError(f"{path}: tensor {name!r} has shape "
                                      f"{self.places[name][1]}, the model expects "
                                      f"{tuple(t.shape)}; config.json and the weights disagree")
        extra = sorted(set(self.places) - set(self.expected))
        if extra:
            self.close()
            raise CheckpointError(f"{path}: unexpected tensor {extra[0]!r}; the checkpoint "
                                  "does not belong to this model configuration")
        # a module's tensors by identity (data pointer, shape): a tied head finds its weight
        # under the embedding's name, the one the file holds
        self.names = {(distributed.local_ptr(self.targets[name]), tuple(t.shape)): name
                      for name, t in self.expected.items() if t.numel()}

    def __enter__(self) -> WeightReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.raw.close()

    def _unreadable(self, e: Exception) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a readable safetensors file ({e}); it is "
                               "corrupt or truncated: restore it or retrain")

    def name_of(self, t: torch.Tensor) -> str | None:
        """The file's name of one of the model's tensors (None for one it does not hold)."""
        if not t.numel():
            return None
        return self.names.get((distributed.local_ptr(t), tuple(t.shape)))

    def read(self, name: str) -> None:
        """Fill the model's tensor `name` (a name in the file) from the file, once."""
        if name in self.done:
            return
        try:
            _read_into(self.raw, self.places[name], self.targets[name])
        except (OSError, ValueError) as e:
            raise self._unreadable(e) from None
        self.done.add(name)

    def read_module(self, module: nn.Module, skip: torch.Tensor | None = None) -> None:
        """Fill `module`'s own parameters and buffers (not its children's), but `skip`."""
        with torch.no_grad():
            for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
                name = None if t is skip else self.name_of(t)
                if name is not None:
                    self.read(name)

    def read_rest(self) -> None:
        with torch.no_grad():
            for name in self.places:
                self.read(name)

    def mapped(self, t: torch.Tensor) -> torch.Tensor | None:
        """The model's tensor `t` as a view of the file's pages (copy on write: the file is
        never changed), or None where it cannot be one (a tensor of another dtype than the
        file's, or at an unaligned offset)."""
        name = self.name_of(t)
        if name is None:
            return None
        dtype, shape, start, end = self.places[name]
        dtype = _SAFETENSORS_DTYPES[dtype]
        if dtype != t.dtype or t.device.type != "cpu" or start % dtype.itemsize or start == end:
            return None
        if self.map is None:
            self.map = mmap.mmap(self.raw.fileno(), 0, access=mmap.ACCESS_COPY)
            self.base = torch.frombuffer(self.map, dtype=torch.uint8)
        self.done.add(name)
        return self.base[start:end].view(dtype).view(shape)

    def rows(self, t: torch.Tensor) -> FileRows:
        """A reader of rows of `t`, a tensor `mapped` lent, straight from the file (FileRows)."""
        return FileRows(self.path, os.dup(self.raw.fileno()), t.data_ptr() - self.base.data_ptr(),
                        tuple(t.shape), t.dtype)

    def lends(self, t: torch.Tensor) -> bool:
        """Whether `t` lies in the file's pages (a tensor `mapped` lent)."""
        return self.map is not None and t.untyped_storage().data_ptr() == self.base.data_ptr()

    def keep_only(self, tensors) -> None:
        """Map in the pages of the lent ones of `tensors` now and let every other page of the
        file go, and from then on never the lent ones (`release` passes over them). A read
        maps the whole page-cache folio it falls in (up to 2 MB here), so the first pass over
        the layers left in the file's pages would otherwise bring back pages of the layers
        converted and let go before them (fp32 SmolLM2: 272 MiB lent, 287 to 352 MiB of the
        file resident after the first token). The lent pages are mapped a page at a time
        (no 2 MB mapping, which letting any of it go would unmap whole)."""
        if self.map is None:
            return
        page, base = mmap.PAGESIZE, self.base.data_ptr()
        spans = sorted((t.data_ptr() - base, t.data_ptr() - base + t.nbytes)
                       for t in tensors if t.numel() and self.lends(t))
        kept: list[list[int]] = []
        for start, end in spans:  # whole pages, joined where they touch
            start, end = start - start % page, min(-(-end // page) * page, len(self.map))
            if kept and start <= kept[-1][1]:
                kept[-1][1] = max(kept[-1][1], end)
            else:
                kept.append([start, end])
        if kept and hasattr(mmap, "MADV_NOHUGEPAGE"):  # Linux
            try:
                self.map.madvise(mmap.MADV_NOHUGEPAGE)
            except OSError:  # a kernel without transparent huge pages: none to avoid
                pass
        # all, the 2 MB mappings of the reads with it (the lent tensors are read only: the
        # file's pages are all they hold, and they are mapped again just below)
        self.map.madvise(mmap.MADV_DONTNEED)
        for start, end in kept:
            _populate(self.map, self.base, start, end)
        self.kept = kept
        self._release_span(0, len(self.map))  # what the populating mapped about them

    def release(self, t: torch.Tensor) -> None:
        """Let this process's copy of a mapped tensor's pages go (the system keeps them cached;
        a later read maps them again): what was read to convert a layer is not kept. With
        them, the pages of the page-cache folios they fall in (a read mapped those too: up to
        FOLIO_BYTES about it), but those keep_only kept."""
        if self.map is None or not t.numel():
            return
        start = t.data_ptr() - self.base.data_ptr()
        end = start + t.numel() * t.element_size()
        if 0 <= start and end <= len(self.map):
            self._release_span(start - start % FOLIO_BYTES,
                               min(-(-end // FOLIO_BYTES) * FOLIO_BYTES, len(self.map)))

    def _release_span(self, start: int, end: int) -> None:
        """madvise(MADV_DONTNEED) over start..end (page-aligned) but keep_only's spans."""
        at = start
        for low, high in self.kept:
            if high <= at:
                continue
            if low >= end:
                break
            if low > at:
                self.map.madvise(mmap.MADV_DONTNEED, at, low - at)
            at = max(at, high)
        if at < end:
            self.map.madvise(mmap.MADV_DONTNEED, at, end - at)


class FileRows:
    """Rows of a (rows, d) table in a file, T[i] for each i of idx, read with pread (os.preadv)
    at offset + i * row_bytes into memory of their own: the file's pages are never mapped into
    the process, so a lookup leaves nothing resident but the rows it returns, where a read of
    a mapped table maps the page-cache folio about each row (up to 2 MB: a 39-token prompt's
    rows took bf16 SmolLM2's peak from 542 MiB to 555, each let go at once after). `fd` is
    the reader's own file, the one loaded (a descriptor of its own, closed with this object):
    a checkpoint written over the path later is not read, as a mapping would not read it
    either."""

    def __init__(self, path: Path, fd: int, offset: int, shape: tuple[int, int],
                 dtype: torch.dtype):
        self.path, self.fd, self.offset, self.shape, self.dtype = path, fd, offset, shape, dtype
        self.row_bytes = shape[1] * dtype.itemsize
        weakref.finalize(self, os.close, fd)

    def __deepcopy__(self, memo) -> FileRows:  # a model copied: the same file, its own fd
        return FileRows(self.path, os.dup(self.fd), self.offset, self.shape, self.dtype)

    def __reduce__(self):
        raise TypeError(f"a model reading rows from {self.path} holds that open file and "
                        "cannot be pickled; load the run again in the other process")

    def __call__(self, idx: torch.Tensor) -> torch.Tensor:
        flat = idx.reshape(-1)
        if flat.numel() and not (0 <= int(flat.min()) and int(flat.max()) < self.shape[0]):
            raise IndexError(f"index out of range in self: ids must be in [0, {self.shape[0]})")
        out = torch.empty(flat.numel(), self.row_bytes, dtype=torch.uint8)
        buffers = out.numpy()
        for i, row in enumerate(flat.tolist()):
            if os.preadv(self.fd, [buffers[i]], self.offset + row * self.row_bytes) \
                    != self.row_bytes:
                raise CheckpointError(f"{self.path} is shorter than when it was loaded; "
                                      "something truncated it: load the run again")
        return out.view(self.dtype).view(*idx.shape, self.shape[1])


# the largest page-cache folio a read of a mapped file maps whole: a PMD's 2 MB on x86-64 (a
# file the system keeps as huge pages), smaller folios fault around less
FOLIO_BYTES = 2 << 20
MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+


def _populate(mapping: mmap.mmap, base: torch.Tensor, start: int, end: int) -> None:
    """Map in pages start..end of `mapping` (read from the page cache, or the disk), without
    reading them into Python: madvise(MADV_POPULATE_READ), else a read of a byte a page."""
    try:
        mapping.madvise(MADV_POPULATE_READ, start, end - start)
    except OSError:  # an older kernel
        base[start:end:mmap.PAGESIZE].sum()


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


# ---- the resumable checkpoint -----------------------------------------------------------------

def save_checkpoint(run_dir: Path, model: nn.Module, opt: torch.optim.Optimizer,
                    state: dict, ema: nn.Module | None = None,
                    best: tuple[nn.Module, dict] | None = None) -> None:
    """Write model, optimizer, trainer state, the weights' moving average (if kept) and the
    best weights (`best`: the module evaluated and its safetensors metadata, when this step's
    evaluation was the best) as one unit: journal, COMPLETE mark, moves. A whole model goes to
    safetensors files that the main process writes (DDP's replicas as they are); a sharded one
    (FSDP) to folders where each process writes its own shards. Every process calls this, and
    all leave together."""
    run_dir = Path(run_dir)
    state = {k: v for k, v in state.items() if k not in ("checkpoint", "best_checkpoint")}
    if best is None:  # the best weights stay those of the last commit
        kept = (_committed_state(run_dir) or {}).get("best_checkpoint")
        if isinstance(kept, str) and SHARDED.fullmatch(kept):
            state["best_checkpoint"] = kept
    if any(distributed.is_dtensor(t) for t in model_state(model).values()):
        _save_sharded(run_dir, model, opt, state, best)
    else:
        _save_whole(run_dir, model, opt, state, ema, best)
    distributed.barrier()


def _save_whole(run_dir: Path, model, opt, state: dict, ema, best) -> None:
    """The main process writes model.safetensors, optimizer.safetensors (and ema, best)."""
    step = str(state["step"])
    weights = model_tensors(model)
    ema_weights = model_tensors(ema) if ema is not None else None
    best_weights = model_tensors(best[0]) if best is not None else None
    opt_t, opt_meta = optimizer_tensors(opt)
    if not distributed.is_main():
        return
    journal = _new_journal(run_dir)
    try:
        save_tensors(journal / "model.safetensors", weights, {"step": step, "format": "pt"})
        if ema_weights is not None:
            save_tensors(journal / "ema.safetensors", ema_weights, {"step": step, "format": "pt"})
        if best_weights is not None:
            state.pop("best_checkpoint", None)  # best.safetensors is the best now
            save_tensors(journal / "best.safetensors", best_weights,
                         {"step": step, **best[1], "format": "pt"})
        save_tensors(journal / "optimizer.safetensors", opt_t,
                     {"step": step, "optimizer": json.dumps(opt_meta)})
        _finish(run_dir, state)
    except BaseException:  # the last committed checkpoint stays the run's state
        shutil.rmtree(journal, ignore_errors=True)
        raise


def _save_sharded(run_dir: Path, model, opt, state: dict, best) -> None:
    """Every process writes its shards of the model and AdamW's moments into
    JOURNAL/checkpoint-<step>/ (and of the best weights into JOURNAL/best-<step>/), then the
    main process commits them with trainer_state.json naming them."""
    step = state["step"]
    last, best_name = distributed.broadcast((_free_name(run_dir, f"checkpoint-{step}"),
                                             _free_name(run_dir, f"best-{step}")))
    journal = _new_journal(run_dir) if distributed.is_main() else run_dir / JOURNAL
    distributed.barrier()  # the journal is there, empty, for every process
    try:
        tensors = {f"model.{k}": v for k, v in model_state(model).items()}
        opt_t, groups = optimizer_shards(model, opt)
        distributed.save_shards(journal / last, tensors | opt_t)
        if best is not None:
            distributed.save_shards(journal / best_name,
                                    {f"model.{k}": v for k, v in model_state(best[0]).items()})
        if distributed.is_main():
            atomic_write_json(journal / last / "optimizer.json", {"param_groups": groups})
            state["checkpoint"] = last
            if best is not None:
                state["best_checkpoint"] = best_name
            _finish(run_dir, state)
    except BaseException as e:  # the last committed checkpoint stays the run's state
        if distributed.is_main():
            shutil.rmtree(journal, ignore_errors=True)
        full = disk_full(e, journal / last) if isinstance(e, Exception) else None
        if full is not None:
            raise full from None
        raise


def _new_journal(run_dir: Path) -> Path:
    journal = run_dir / JOURNAL
    shutil.rmtree(journal, ignore_errors=True)
    journal.mkdir()
    return journal


def _free_name(run_dir: Path, name: str) -> str:
    """`name`, or name.2, name.3...: a folder name not in use (committed folders never change,
    even when the same step is checkpointed again)."""
    n, free = 1, name
    while (run_dir / free).exists():
        n += 1
        free = f"{name}.{n}"
    return free


def _finish(run_dir: Path, state: dict) -> None:
    journal = run_dir / JOURNAL
    atomic_write_json(journal / "trainer_state.json", state)
    atomic_write_text(journal / "COMPLETE", str(state["step"]))
    _commit(run_dir)


def _commit(run_dir: Path) -> None:
    """Move a COMPLETE journal's folders and files into the run, trainer_state.json last;
    then remove what it replaced. A crash at any point is finished by running it again."""
    journal = run_dir / JOURNAL
    for entry in sorted(journal.iterdir()):
        if entry.is_dir() and SHARDED.fullmatch(entry.name):
            shutil.rmtree(run_dir / entry.name, ignore_errors=True)  # a leftover, never named
            os.replace(entry, run_dir / entry.name)
    for name in RESUME_FILES:
        if (journal / name).exists():
            os.replace(journal / name, run_dir / name)
    _fsync_dir(run_dir)
    shutil.rmtree(journal, ignore_errors=True)
    _prune(run_dir)


def _prune(run_dir: Path) -> None:
    """Remove what the committed trainer_state.json no longer names: older sharded folders,
    and the files a sharded checkpoint replaced (model, ema, optimizer; best.safetensors under
    a sharded best). Nothing, when trainer_state.json cannot be read."""
    state = _committed_state(run_dir)
    if state is None:
        return
    named = {state.get("checkpoint"), state.get("best_checkpoint")}
    for entry in run_dir.iterdir():
        if entry.is_dir() and SHARDED.fullmatch(entry.name) and entry.name not in named:
            shutil.rmtree(entry, ignore_errors=True)
    stale = (["model.safetensors", "ema.safetensors", "optimizer.safetensors"]
             if state.get("checkpoint") else [])
    stale += ["best.safetensors"] if state.get("best_checkpoint") else []
    for name in stale:
        (run_dir / name).unlink(missing_ok=True)


def _committed_state(run_dir: Path) -> dict | None:
    """RUN/trainer_state.json as committed, or None when it is missing or unreadable."""
    try:
        state = json.loads((Path(run_dir) / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def recover(run_dir: Path) -> None:
    """Finish a checkpoint commit a crash interrupted, or discard an incomplete one. Only the
    run's writer calls it, holding the run's lock (rundir.writer_lock): a reader that did
    would pull the journal from under a training process."""
    journal = Path(run_dir) / JOURNAL
    if journal.exists():
        if (journal / "COMPLETE").exists():
            _commit(Path(run_dir))
            return
        shutil.rmtree(journal, ignore_errors=True)
    _prune(Path(run_dir))  # a crash between a commit and its pruning


# ---- sharded checkpoints: read -----------------------------------------------------------------

def sharded_folder(run_dir: Path, which: str = "last") -> Path | None:
    """The folder of the run's sharded checkpoint (FSDP) that trainer_state.json names for the
    `which` ("last" or "best") weights; None when they are a safetensors file."""
    state = _committed_state(run_dir) or {}
    name = state.get("checkpoint" if which == "last" else "best_checkpoint")
    return Path(run_dir) / name if isinstance(name, str) and SHARDED.fullmatch(name) else None


def load_sharded_model(model: nn.Module, run_dir: Path, which: str = "last") -> Path:
    """Read the run's sharded `which` weights into `model` (a whole one: each process reads
    every shard of each tensor, alone), and return their folder. A training process may
    commit a newer checkpoint meanwhile and remove this one: then the newer one is read."""
    for attempt in range(3):
        folder = sharded_folder(run_dir, which)
        if folder is None:
            raise CheckpointError(f"{run_dir} has no sharded {which} checkpoint; is this a "
                                  "monotile run directory?")
        try:
            with torch.no_grad():
                distributed.load_shards(folder, {f"model.{k}": v
                                                 for k, v in model_state(model).items()})
            return folder
        except CheckpointError:
            if attempt == 2 or sharded_folder(run_dir, which) == folder:
                raise
    raise AssertionError("unreachable")


def load_model_shards(model: nn.Module, run_dir: Path, state: dict) -> None:
    """FSDP resume: the weights of the sharded checkpoint that `state` (trainer_state.json)
    names, read into `model` once FSDP has sharded it: each process reads only the pieces
    that overlap its own shards, from files written by any number of processes (DCP
    reshards), and never holds a whole tensor. Nothing, when the checkpoint is a file (the
    model was loaded whole before it was sharded)."""
    name = state.get("checkpoint")
    if isinstance(name, str) and SHARDED.fullmatch(name):
        with torch.no_grad():
            distributed.load_shards(Path(run_dir) / name,
                                    {f"model.{k}": v for k, v in model_state(model).items()})


def optimizer_shards(model: nn.Module, opt: torch.optim.Optimizer
                     ) -> tuple[dict[str, torch.Tensor], list[dict] | None]:
    """AdamW's state by parameter name, as this process holds it (FSDP: its shards), from
    torch.distributed.checkpoint.state_dict: optimizer.<name>.<key> -> tensor (a 0-d one,
    the step, as 1 value), and the param groups (JSON, parameters by name); ({}, None)
    before the first step (DCP's helper would take a step of zero gradients to make some)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    if not opt.state:
        return {}, None
    osd = get_optimizer_state_dict(model, opt)
    return _flat(osd["state"]), osd["param_groups"]


def _flat(state: dict) -> dict[str, torch.Tensor]:
    """{name: {key: tensor}} as {optimizer.<name>.<key>: tensor}, a 0-d tensor as a view of 1
    value (written and read in place, like the others)."""
    return {f"optimizer.{name}.{key}": value.view(1) if value.dim() == 0 else value
            for name, st in state.items() for key, value in st.items()}


def load_optimizer_state(model: nn.Module, opt: torch.optim.Optimizer, run_dir: Path,
                         state: dict) -> None:
    """The optimizer state of the checkpoint that `state` (trainer_state.json) is part of:
    optimizer.safetensors, or the shards of its sharded folder, which any number of processes
    reads (each process its own shards under FSDP, the whole moments otherwise)."""
    name = state.get("checkpoint")
    if not (isinstance(name, str) and SHARDED.fullmatch(name)):
        load_optimizer(opt, Path(run_dir) / "optimizer.safetensors")
        return
    from torch.distributed.checkpoint.state_dict import (get_optimizer_state_dict,
                                                         set_optimizer_state_dict)
    folder = Path(run_dir) / name
    try:
        groups = json.loads((folder / "optimizer.json").read_text(encoding="utf-8"))
        groups = groups["param_groups"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/optimizer.json is missing or damaged ({e}); the run "
                              "cannot be resumed exactly: restore it, or start a new run") \
            from None
    if groups is None:  # saved before the first step: a new optimizer is that state
        return
    osd = get_optimizer_state_dict(model, opt)  # the state's shapes and shards, to be filled
    distributed.load_shards(folder, _flat(osd["state"]))
    set_optimizer_state_dict(model, opt, {"state": osd["state"], "param_groups": groups})


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
