"""Linear layers with their weights laid out for oneDNN, for inference on CPU.

    y = x W^T + b        (the same product; only the memory layout of W changes)

Decoding one token at batch 1 reads every weight once and does two flops per weight read, so
its speed is the speed at which the matrix-vector products stream W from memory. PyTorch's
nn.Linear hands a row-major W to MKL's GEMV, which streams it at ~12 GB/s on the 2-core CPU
this was measured on; the same W reordered into oneDNN's blocked layout (the packing PyTorch's
own compiler does when it freezes a CPU model) streams at ~21 GB/s in fp32 and ~18 GB/s of
bf16, so a GPT-2-small token takes ~1.8x less time (bench/decode.py). llama.cpp repacks its
weights on load for the same reason.

A packed layer is for inference only: it holds no Parameter and refuses to train. Its
state_dict holds the plain W, so a packed model saves and loads like the original. A head tied
to an embedding gets its own packed copy (the embedding still looks rows up in the plain one).
"""

from __future__ import annotations

import fnmatch
import json
import os
import platform
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn


def packing_available(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether oneDNN can pack a weight of `dtype` on `device`: CPU, fp32 always, bf16 where the
    CPU has bf16 instructions (AVX512-BF16 or AMX)."""
    if torch.device(device).type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's blocked layout (from nn.Linear, inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, rows: int = 1):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.rows = rows
        self._pack(weight)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _pack(self, weight: torch.Tensor) -> None:
        # the hint `rows` picks oneDNN's layout as for products with that many rows of x;
        # any row count uses the same packed weight, at another speed (33 rows: 1.6x slower
        # packed for 1 than for 33, an fp32 384->1152 layer on an AMD EPYC; 1 row: 1.45x
        # faster packed for 16 than for 1, SmolLM2's layers). pack_linears measures which
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(),
                                                              self.rows)

    @classmethod
    def from_linear(cls, linear: nn.Linear, rows: int = 1) -> PackedLinear:
        return cls(linear.weight, linear.bias, rows)

    @property
    def weight(self) -> torch.Tensor:
        """The plain (out, in) W, unpacked (a copy)."""
        return self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise RuntimeError("a PackedLinear is for inference; load the run again to train it")
        return torch.ops.mkldnn._linear_pointwise(x.to(self.dtype), self.packed, self.bias,
                                                  "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.weight
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        key = prefix + "weight"
        if key in state_dict:
            weight = state_dict[key]
            if tuple(weight.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape "
                                  f"{tuple(weight.shape)}, the packed layer holds "
                                  f"{(self.out_features, self.in_features)}")
            else:
                self._pack(weight.to(self.dtype))
        elif strict:
            missing_keys.append(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if key in unexpected_keys:  # the weight is no Parameter here, but it was taken
            unexpected_keys.remove(key)

    def __deepcopy__(self, memo):  # oneDNN tensors have no storage to copy
        twin = PackedLinear(self.weight, self.bias, self.rows)
        return twin.train(self.training)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.dtype}, layout=onednn, "
                f"rows={self.rows}")


# The layouts tried for x of `rows` rows: oneDNN's layout for that many rows, and its layout
# for 16, which streams a decoding step's weights (one row) 1.45x faster in fp32 and 1.15x in
# bf16 than the one-row layout on an AMD EPYC (SmolLM2, 29 -> 42 tokens/s): the row-count hint
# picks the blocking, and the one chosen for a single row is not the fastest one everywhere
HINTS = (16,)
# a layout for more rows than this is timed at this many: GEMMs of many rows rank layouts alike,
# and a first start measures in a fraction of a second
MEASURED_ROWS = 256


def rows_of(name: str, rows: int | Mapping[str, int]) -> int:
    """The rows of x the layer `name` multiplies: `rows` itself, or the value of the first
    of its patterns (fnmatch, e.g. "encoder.*") that the name matches; 1 if none does."""
    if isinstance(rows, int):
        return rows
    return next((n for pattern, n in rows.items() if fnmatch.fnmatchcase(name, pattern)), 1)


def pack_linears(model: nn.Module, measure: bool = False,
                 rows: int | Mapping[str, int] = 1) -> list[str]:
    """Replace every plain nn.Linear of `model` whose weight oneDNN can pack (CPU; fp32, or bf16
    where supported) by a PackedLinear, in place, and put the model in eval mode. LoRA and int8
    layers stay as they are. `rows`: the rows of x a call multiplies (1: decoding; an
    encoder's sentence: ~32), or {name pattern: rows} (rows_of: Whisper's encoder reads 1500
    frames, its decoder a token). Without `measure`, every layer is laid out for its rows. With
    it, the layers of each shape get the layout `layout` chose for them on this CPU. Returns
    the names replaced."""
    names = []
    for (n_in, n_out, dtype, n_rows), layers in packable_groups(model, rows).items():
        hint = layout(n_in, n_out, dtype, n_rows, len(layers)) if measure else n_rows
        while hint and layers:  # one layer at a time, each plain weight let go as it is packed
            parent, child_name, name, linear = layers.pop(0)
            setattr(parent, child_name, PackedLinear.from_linear(linear, hint).eval())
            names.append(name)
            del linear
    model.eval()
    return names


def packable_groups(model: nn.Module, rows: int | Mapping[str, int] = 1
                    ) -> dict[tuple, list[tuple[nn.Module, str, str, nn.Linear]]]:
    """The plain nn.Linear layers oneDNN can pack, by (in, out, dtype, rows of x): each as
    (parent, its name there, its full name, the layer)."""
    groups: dict[tuple, list[tuple[nn.Module, str, str, nn.Linear]]] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            if not packing_available(child.weight.device, child.weight.dtype):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            key = (child.in_features, child.out_features, child.weight.dtype,
                   rows_of(name, rows))
            groups.setdefault(key, []).append((parent, child_name, name, child))
    return groups


def layout(n_in: int, n_out: int, dtype: torch.dtype, rows: int, count: int) -> int:
    """The layout for `count` layers n_in -> n_out of `dtype` multiplying x of `rows` rows on
    this CPU: 0 for plain nn.Linear, else the row hint of a packing. The one that a pass of x
    over `count` such layers runs fastest in (fastest_layout: plain, packed for `rows`, packed
    for each of HINTS; the layout that wins on one processor can lose on another), timed once
    on layers of random weights, as it does not depend on the values, so that no real layer
    need be held in two forms. The verdict is kept per CPU model, PyTorch version and thread
    count in the cache's layouts.json (delete it to measure again)."""
    key = f"{count} x {n_in}->{n_out} {str(dtype).removeprefix('torch.')} @ {rows} rows"
    hint = measured(key)
    if hint is None:
        plain = []
        for _ in range(count):
            linear = nn.Linear(n_in, n_out, bias=False, device="meta", dtype=dtype)
            linear.weight = nn.Parameter(torch.randn(n_out, n_in, dtype=dtype),
                                         requires_grad=False)
            plain.append(linear)
        hint, packed = fastest_layout(plain, rows)
        del plain, packed
        remember(key, hint)
    return hint


def fastest_layout(plain: list[nn.Linear], rows: int = 1) -> tuple[int, list[PackedLinear]]:
    """(hint, packed layers) of the fastest layout for `plain`'s layers at x of `rows` rows
    (timed at no more than MEASURED_ROWS of them): 0 and [] when nn.Linear itself is the
    fastest. Each layout is timed against the best so far (seconds_per_pass); a loser's
    copies are let go before the next is made."""
    timed = min(rows, MEASURED_ROWS)
    best_hint, best_layers = 0, []
    best = seconds_per_pass(plain, timed)
    for hint in dict.fromkeys((rows, *HINTS)):
        packed = [PackedLinear.from_linear(linear, hint).eval() for linear in plain]
        took = seconds_per_pass(packed, timed)
        if took < best:
            best_hint, best_layers, best = hint, packed, took
        del packed
    return best_hint, best_layers


def _verdicts_file() -> Path:
    from ..data import cache_dir
    return cache_dir() / "layouts.json"


def _machine() -> str:
    """This CPU's model name, PyTorch's version and its thread count: what a verdict holds
    for."""
    name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def measured(key: str) -> int | None:
    """The layout fastest_layout chose for `key` on this machine before (0 plain, else the
    packing's row hint; kept in the cache's layouts.json, so a start-up measures once per
    machine and shape), or None."""
    try:
        hint = json.loads(_verdicts_file().read_text()).get(_machine(), {}).get(key)
    except (OSError, ValueError, AttributeError):
        return None
    return hint if isinstance(hint, int) and not isinstance(hint, bool) and hint >= 0 else None


def remember(key: str, verdict: int) -> None:
    """Keep a verdict for this machine; a cache that cannot be written is no error."""
    path = _verdicts_file()
    try:
        doc = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(doc, dict):
            doc = {}
    except (OSError, ValueError):
        doc = {}
    doc.setdefault(_machine(), {})[key] = verdict
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass


@torch.no_grad()
def seconds_per_pass(layers: list[nn.Module], rows: int = 1, rounds: int = 5) -> float:
    """Seconds of y = x W^T + b for x of `rows` rows through every layer in turn (one row:
    each W read from memory once, as a decoding step reads it), best of `rounds` after one
    to warm up."""
    first = layers[0]
    dtype = first.weight.dtype if isinstance(first, nn.Linear) else first.dtype
    x = torch.randn(rows, first.in_features, dtype=dtype)

    def once() -> float:
        start = time.perf_counter()
        for layer in layers:
            layer(x)
        return time.perf_counter() - start
    once()
    return min(once() for _ in range(rounds))
