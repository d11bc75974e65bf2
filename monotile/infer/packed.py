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

import json
import os
import platform
import time
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
        # the hint `rows` picks the layout for products with that many rows of x (1: the
        # matrix-vector products of decoding; ~32: a sentence through an encoder). Other
        # row counts use the same packed weight, a little slower (1.6x at 33 rows packed
        # for 1, an fp32 384->1152 layer on an AMD EPYC)
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
                f"bias={self.bias is not None}, dtype={self.dtype}, layout=onednn")


def pack_linears(model: nn.Module, measure: bool = False, rows: int = 1) -> list[str]:
    """Replace every plain nn.Linear of `model` whose weight oneDNN can pack (CPU; fp32, or bf16
    where supported) by a PackedLinear laid out for x of `rows` rows (1: decoding; an
    encoder's sentence: ~32), in place, and put the model in eval mode. LoRA and int8 layers
    stay as they are. With `measure`, the layers of each shape (in, out, dtype) are packed
    only where one pass of x of `rows` rows over all of them is faster packed than plain on
    this CPU (faster_packed): the layout that wins on one processor can lose on another (and
    at one row count, lose at another). The verdict is kept per CPU model, PyTorch version
    and thread count in the cache's packing.json (delete it to measure again). Returns the
    names replaced."""
    groups: dict[tuple, list[tuple[nn.Module, str, str, nn.Linear]]] = {}
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            if not packing_available(child.weight.device, child.weight.dtype):
                continue
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            key = (child.in_features, child.out_features, child.weight.dtype)
            groups.setdefault(key, []).append((parent, child_name, name, child))
    names = []
    for (n_in, n_out, dtype), layers in groups.items():
        key = f"{len(layers)} x {n_in}->{n_out} {str(dtype).removeprefix('torch.')}"
        key += f" @ {rows} rows" if rows != 1 else ""
        verdict = measured(key) if measure else True
        if verdict is None:  # measure once: the whole group packed beside the plain one
            packed = [PackedLinear.from_linear(linear, rows).eval() for *_, linear in layers]
            verdict = faster_packed([linear for *_, linear in layers], packed, rows=rows)
            remember(key, verdict)
            if not verdict:
                continue
            for (parent, child_name, name, _), new in zip(layers, packed):
                setattr(parent, child_name, new)
                names.append(name)
        elif verdict:  # one layer at a time, each plain weight let go as its copy is made
            while layers:
                parent, child_name, name, linear = layers.pop(0)
                setattr(parent, child_name, PackedLinear.from_linear(linear, rows).eval())
                names.append(name)
                del linear
    model.eval()
    return names


def _verdicts_file() -> Path:
    from ..data import cache_dir
    return cache_dir() / "packing.json"


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


def measured(key: str) -> bool | None:
    """The verdict faster_packed gave for `key` on this machine before (kept in the cache's
    packing.json, so a start-up measures once per machine and shape), or None."""
    try:
        return json.loads(_verdicts_file().read_text()).get(_machine(), {}).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def remember(key: str, verdict: bool) -> None:
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
def faster_packed(plain: list[nn.Linear], packed: list[PackedLinear], rounds: int = 5,
                  rows: int = 1) -> bool:
    """Whether y = x W^T + b for x of `rows` rows through every layer in turn (one row: each
    W read from memory once, as a decoding step reads it) takes less time packed, best of
    `rounds`."""
    x = torch.randn(rows, plain[0].in_features, dtype=plain[0].weight.dtype)

    def best(layers) -> float:
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            for layer in layers:
                layer(x)
            times.append(time.perf_counter() - start)
        return min(times)
    best(plain), best(packed)  # warm up
    return best(packed) < best(plain)
