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
import functools
import json
import os
import platform
import time
from collections.abc import Callable, Hashable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
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
# layouts (and native.float32_native_shapes) time at most this much of random weights: a
# model's layers as a pass streams them, more than a large last-level cache holds (480 MiB
# on one Xeon), never a large model's whole size
MEASURED_BYTES = 768 << 20


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
    it, the layers of each shape get the layout `layouts` chose for them on this CPU. Returns
    the names replaced."""
    names, groups = [], packable_groups(model, rows)
    chosen: dict[tuple, int] = {}
    if measure:
        for dtype in {key[2] for key in groups}:
            shapes = {(n_in, n_out, n_rows): len(layers)
                      for (n_in, n_out, kind, n_rows), layers in groups.items() if kind == dtype}
            chosen |= {(*shape[:2], dtype, shape[2]): hint
                       for shape, hint in layouts(shapes, dtype).items()}
    for (n_in, n_out, dtype, n_rows), layers in groups.items():
        hint = chosen[n_in, n_out, dtype, n_rows] if measure else n_rows
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


def layouts(shapes: Mapping[tuple[int, int, int], int], dtype: torch.dtype
            ) -> dict[tuple[int, int, int], int]:
    """The layout of each shape of a model's float layers, {(in, out, rows of x): count} of
    `dtype`, on this CPU: 0 for plain nn.Linear, else the row hint of a packing. The one whose
    layers a pass of x through all of them spends least time in (LAYOUTS: plain, packed for
    its rows, packed for each of HINTS; the layout that wins on one processor can lose on
    another), timed once on layers of random weights, as it does not depend on the values, so
    that no real layer need be held in two forms. The shapes are timed together, in a model's
    order: a shape's layers timed alone sit in a large last-level cache, where a model's pass
    streams them from memory, and the two can rank layouts apart (bench/layouts.py prints the
    timings). The verdicts are kept per CPU, PyTorch version and thread count in the cache's
    layouts.json (delete it to measure again)."""
    name = str(dtype).removeprefix("torch.")
    return fastest(shapes, {way: layout_maker(hint) for way, hint in LAYOUTS.items()},
                   lambda way, shape: LAYOUTS[way](shape),
                   lambda shape, count: f"{count} x {shape[0]}->{shape[1]} {name} @ "
                                        f"{shape[2]} rows in a pass", dtype)


# the layouts a float layer may take, each as the packing's row hint it gives a shape (in,
# out, rows of x): 0 for nn.Linear's plain product
LAYOUTS: dict[str, Callable[[tuple[int, int, int]], int]] = {
    "plain": lambda shape: 0, "rows": lambda shape: shape[2],
    **{str(h): (lambda shape, h=h: h) for h in HINTS}}


def layout_maker(hint: Callable[[tuple[int, int, int]], int]) -> Callable:
    """W, shape -> W's layer in the layout hint(shape) gives (0: nn.Linear's plain product),
    for time_ways."""
    def make(w: torch.Tensor, shape: tuple[int, int, int]):
        rows = hint(shape)
        return (lambda x: F.linear(x, w)) if not rows else PackedLinear(w, None, rows).eval()
    return make


def fastest(shapes: Mapping[tuple, int], ways: Mapping[str, Callable],
            verdict: Callable[[str, tuple], int], key: Callable[[tuple, int], str],
            dtype: torch.dtype = torch.float32) -> dict[tuple, int]:
    """{shape: verdict(the fastest of `ways` for it, shape)} for a model's layer shapes
    {(in, out, rows of x): count}, timed together once per machine (time_ways; the first of
    equally fast ways wins) and kept in layouts.json under key(shape, count)."""
    def measure() -> dict[tuple, int]:
        times = time_ways(shapes, ways, dtype)
        return {shape: verdict(min(times, key=lambda way: times[way][shape]), shape)
                for shape in shapes}
    return remembered({shape: key(shape, count) for shape, count in shapes.items()}, measure)


def remembered(keys: Mapping[tuple, str], measure: Callable[[], Mapping[tuple, int]],
               valid: Callable[[object], int | None] | None = None) -> dict[tuple, int]:
    """{shape: verdict} as this machine kept them in layouts.json under keys[shape]; where
    any is missing, or not `valid` (default: an int >= 0), measure() gives them all, and they
    are kept (the file read once and written once)."""
    valid = valid or _verdict
    here = _verdicts_here()
    verdicts = {shape: valid(here.get(k)) for shape, k in keys.items()}
    if None in verdicts.values():
        verdicts = dict(measure())
        remember_all({keys[shape]: v for shape, v in verdicts.items()})
    return verdicts


@torch.no_grad()
def time_ways(shapes: Mapping[tuple[int, int, int], int], ways: Mapping[str, Callable],
              dtype: torch.dtype = torch.float32, rounds: int = 5
              ) -> dict[str, dict[tuple[int, int, int], float]]:
    """{way: {shape: seconds a pass spends in that shape's layers}}: each of `ways` (W (out,
    in), shape -> the product as a function of x) made of random layers of `shapes`, {(in,
    out, rows of x): count}, in a model's order (one of each shape a block, as long as its
    count lasts; at most MEASURED_BYTES of weights in all, and x of at most MEASURED_ROWS
    rows), each call on its own clock, best of `rounds` passes after one to warm up. One
    way's layers are held at a time, each made from its own random W."""
    total = sum(dtype.itemsize * n_in * n_out * count
                for (n_in, n_out, _), count in shapes.items())
    scale = min(1.0, MEASURED_BYTES / total)
    counts = {shape: max(1, round(count * scale)) for shape, count in shapes.items()}
    order = [shape for i in range(max(counts.values())) for shape in shapes if i < counts[shape]]
    inputs = {shape: torch.randn(min(shape[2], MEASURED_ROWS), shape[0], dtype=dtype)
              for shape in shapes}
    times = {}
    for way, make in ways.items():
        calls = [make(torch.randn(shape[1], shape[0], dtype=dtype), shape) for shape in order]
        times[way] = pass_times([(shape, call, inputs[shape])
                                 for shape, call in zip(order, calls)], rounds)
        del calls
    return times


def pass_times(calls: list[tuple[Hashable, Callable, torch.Tensor]], rounds: int
               ) -> dict[Hashable, float]:
    """{key: seconds a pass spends in its calls}: each (key, f, x) of `calls` run in turn as
    f(x), on its own clock, best of `rounds` passes after one to warm up."""
    keys = dict.fromkeys(key for key, _, _ in calls)
    best = dict.fromkeys(keys, float("inf"))
    for attempt in range(rounds + 1):
        took = dict.fromkeys(keys, 0.0)
        for key, call, x in calls:
            start = time.perf_counter()
            call(x)
            took[key] += time.perf_counter() - start
        if attempt:
            best = {key: min(best[key], took[key]) for key in keys}
    return best


def _verdicts_file() -> Path:
    from ..data import cache_dir
    return cache_dir() / "layouts.json"


@functools.cache
def _cpu() -> str:
    """This CPU: its model name, and where a virtual machine names every model alike, its
    family, model, stepping and cache (read once a process)."""
    name = platform.processor()
    try:
        info = dict(line.split(":", 1) for line in
                    Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
                    if ":" in line)
        info = {k.strip(): v.strip() for k, v in info.items()}
        name = info.get("model name", name)
        ids = [info.get(k) for k in ("cpu family", "model", "stepping", "cache size")]
        if all(ids):
            name += f" ({'/'.join(ids[:3])}, {ids[3]})"
    except (OSError, ValueError):
        pass
    return name


def _machine() -> str:
    """This CPU, PyTorch's version and its thread count: what a verdict holds for."""
    return f"{_cpu()} | torch {torch.__version__} | {torch.get_num_threads()} threads"


def _verdicts_here() -> dict:
    """This machine's verdicts in layouts.json, read once ({} where none can be read)."""
    try:
        here = json.loads(_verdicts_file().read_text()).get(_machine(), {})
    except (OSError, ValueError, AttributeError):
        return {}
    return here if isinstance(here, dict) else {}


def _verdict(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 \
        else None


def remember_all(verdicts: Mapping[str, int]) -> None:
    """Keep verdicts for this machine, the file written once; a cache that cannot be written
    is no error."""
    path = _verdicts_file()
    try:
        doc = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(doc, dict):
            doc = {}
    except (OSError, ValueError):
        doc = {}
    doc.setdefault(_machine(), {}).update(verdicts)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(doc, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass
