"""Weight-only int8 and int4 quantisation for inference.

int8, one scale per output channel:

    s_i = max_j |W_ij| / 127,   Q_ij = round(W_ij / s_i) in [-127, 127],   W ~ s_i Q_ij
    y = x W^T + b  ~  (x Q^T) * s + b

Every Linear and Embedding of the model keeps Q (int8) and s (fp32): a quarter of the bytes, and
so a quarter of the memory traffic a decoding step spends reading weights. A tied embedding and
output head share one Q and s. On CPU the product runs in PyTorch's int8-weight kernel
(`torch._weight_int8pack_mm`, the one gpt-fast and torchao use) with bf16 activations; where
that kernel is missing or does not fit (inputs of a multiple of 16 features only), Q is
turned back into W ~ s Q for each product. Many rows of x at once (a prompt, an audio's
1500 frames) are rounded to 8 bits too, one scale a row, and multiplied as integers in one GEMM
(`int8_gemm`, as CTranslate2's int8 and llama.cpp's Q8_0 do). Norms and everything else stay
as they were.

int4, asymmetric in groups of G = 32 inputs (llama.cpp's Q4_1 block, so a Q4_1 file's weights,
dequantized on import, round back to the very same 4-bit values):
    d = (max_g W - min_g W) / 15,   Q = round((W - min_g W) / d) in [0, 15],   W ~ d Q + min_g W
PyTorch's CPU kernel (`torch.ops.aten._weight_int4pack_mm_for_cpu`, gpt-fast's and torchao's)
takes Q packed two to a byte and (scale, zero) per group with W ~ (Q - 8) scale + zero, so
scale = d and zero = min + 8 d, in bf16 with bf16 activations (its fp32 and fp16 paths are
slow references, ~20x slower): 5 bits a weight, as Q4_1 (whose d and min are fp16).
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F
from torch import nn


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-row int8: (Q int8 (N, K), s fp32 (N,)) with W ~ s[:, None] Q."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=1) / 127).clamp_min(1e-12)
    q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


# From this many rows of x on (a prompt's prefill), a product is faster as one GEMM (int8: x
# rounded to 8 bits, an integer GEMM; int4: W dequantized to bf16) than in the weight-only
# kernels, which are built for a few rows:
# at 512 rows 2.6x faster for SmolLM2's layers, at 64 1.6x; at 16 the kernels win (2 threads,
# AMD EPYC; bench/real_models.py's prefill). A layer's own `gemm_rows` starts here;
# tune_gemm_rows measures it for this machine (on an Intel Xeon the kernels won up to ~110
# rows in int8 and ~200 in int4: dequantizing W costs more there)
GEMM_ROWS = 32
# the row counts tune_gemm_rows times both ways at, and the layers of a shape it times (up to
# 1024: native.py's kernels take 4 rows of x a pass over W, and SmolLM2's int4 layers at 512
# rows took 8.2 ms there against 15.1 dequantized + GEMM on an AMD EPYC)
GEMM_ROWS_TRIED = (32, 64, 128, 256, 512, 1024)
GEMM_LAYERS_TIMED = 4


_workspaces = threading.local()


def workspace(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer of `shape` kept for this thread and reused: the bf16 W of a dequantized layer
    is written into it, not into a new tensor each call (SmolLM2's 120 layers allocating and
    freeing a W each during a prompt's prefill left the C allocator holding up to ~130 MB more
    than it gave back). One buffer a dtype, as large as the largest shape asked for (SmolLM2's
    four layer shapes: 3.5 MB of bf16, not 7 for one each); its contents last until the next
    call."""
    numel, key = math.prod(shape), (dtype, torch.device(device))
    kept = getattr(_workspaces, "buffers", None)
    if kept is None:
        kept = _workspaces.buffers = {}
    if key not in kept or kept[key].numel() < numel:
        kept.pop(key, None)  # the smaller one let go first
        kept[key] = torch.empty(numel, dtype=dtype, device=device)
    return kept[key][:numel].view(shape)


def int8_gemm(x: torch.Tensor, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """y ~ x W^T for x (M, K) and W ~ s Q (Q (N, K) int8, s (N,)), x rounded to 8 bits a row:

        dx = max_k |x_k| / 127,   X = round(x / dx),   y = (X Q^T) dx s

    X Q^T summed exactly in int32 by one integer GEMM (torch._int_mm: oneDNN's VNNI or AMX
    int8 kernels), as CTranslate2's int8 multiplies; where W had been dequantized to bf16 for a
    bf16 GEMM, Whisper tiny.en's int8 real-time factor on the FSDD digits went 0.811 -> 0.719
    (bench/whisper.py, AMD EPYC, 2 threads). Rows of zeros give zeros."""
    x = x.float()
    dx = x.abs().amax(-1, keepdim=True) / 127
    xq = (x / torch.where(dx > 0, dx, 1.0)).round_().to(torch.int8)  # in place: 2x faster
    return torch._int_mm(xq, q.t()).float().mul_(dx).mul_(s)


def _int_gemm_fits(x: torch.Tensor) -> bool:
    """torch._int_mm on this device (PyTorch's CPU one runs in oneDNN, where it is built in;
    a CPU without it keeps W dequantized to bf16)."""
    return (x.device.type == "cpu" and hasattr(torch, "_int_mm")
            and torch.backends.mkldnn.is_available())


def gemm_layers(model: nn.Module) -> list[nn.Module]:
    """`model`'s layers whose rows of x take their weight-only kernel or, from the layer's
    `gemm_rows` on, one GEMM of W dequantized (int8, int4 and native.py's layers on the CPU);
    an int4 layer the kernel cannot take, or whose packing does not unpack, has no choice."""
    return [m for m in model.modules() if hasattr(m, "gemm_rows")
            and getattr(m, "fits", True) and getattr(m, "unpacks", True)
            and next(m.buffers(), torch.empty(0)).device.type == "cpu"]


@torch.no_grad()
def tune_gemm_rows(model: nn.Module) -> None:
    """Set the `gemm_rows` of each of `model`'s layers that has one (int8, int4, native.py's):
    the fewest rows of x, of GEMM_ROWS_TRIED, from which the layers of its (kind, in, out)
    multiplied faster through one GEMM (int8: x rounded to 8 bits, int8_gemm; else W
    dequantized, a bf16 GEMM) than through their kernel, at
    that row count and the next one tried (twice the largest where the kernel won there).
    Timed once per machine on up to GEMM_LAYERS_TIMED of the model's own layers of each
    shape, in its order, and kept with packed.py's verdicts (layouts.json)."""
    from .packed import remembered
    shapes: dict[tuple, list[nn.Module]] = {}
    for m in gemm_layers(model):  # a native layer's packed dtype apart: fp32's, bf16's GEMMs
        kind = type(m).__name__ + (f" {str(m.packed.dtype).removeprefix('torch.')}"
                                   if hasattr(m, "packed") else "")
        shapes.setdefault((kind, m.in_features, m.out_features), []).append(m)
    allowed = (*GEMM_ROWS_TRIED, 2 * GEMM_ROWS_TRIED[-1])  # a stored count else: timed again

    def measure() -> dict[tuple, int]:
        timed = _time_gemm_rows({shape: group[:GEMM_LAYERS_TIMED]
                                 for shape, group in shapes.items()})
        _workspaces.__dict__.pop("buffers", None)  # the GEMM's W, if the kernels won
        return timed
    found = remembered({shape: f"{shape[0]} {shape[1]}->{shape[2]}: one GEMM from rows"
                        for shape in shapes}, measure,
                       lambda value: value if value in allowed else None)
    for shape, group in shapes.items():
        for m in group:
            m.gemm_rows = found[shape]


def _time_gemm_rows(shapes: dict[tuple, list[nn.Module]]) -> dict[tuple, int]:
    """{shape: gemm_rows} from timing each shape's layers, called in turn, both ways
    (packed.pass_times), at each row count tried until the GEMM has won at two in a row (it
    gains as rows grow)."""
    from .packed import pass_times
    found, streak = {}, {shape: 0 for shape in shapes}
    for rows in GEMM_ROWS_TRIED:
        left = {shape: group for shape, group in shapes.items() if shape not in found}
        if not left:
            break
        order = [group[i] for i in range(max(map(len, left.values())))
                 for group in left.values() if i < len(group)]
        shape_of = {id(m): shape for shape, group in left.items() for m in group}
        xs = {n: torch.randn(rows, n) for n in {m.in_features for m in order}}
        times = {}
        for way, threshold in (("kernel", rows + 1), ("gemm", 0)):
            for m in order:
                m.gemm_rows = threshold
            times[way] = pass_times([(shape_of[id(m)], m, xs[m.in_features]) for m in order],
                                    rounds=2)
        for shape in left:
            won = times["gemm"][shape] <= times["kernel"][shape]
            streak[shape] = streak[shape] + 1 if won else 0
            if streak[shape] == 2 or (won and rows == GEMM_ROWS_TRIED[-1]):
                found[shape] = GEMM_ROWS_TRIED[GEMM_ROWS_TRIED.index(rows) - streak[shape] + 1]
    return {shape: found.get(shape, 2 * GEMM_ROWS_TRIED[-1]) for shape in shapes}


def _rows(x: torch.Tensor, in_features: int) -> int:
    return x.numel() // in_features if x.device.type == "cpu" else 0


def _int8_kernel_fits(device: torch.device, in_features: int) -> bool:
    """PyTorch's CPU kernel is right only for inputs of a multiple of 16 features (others give
    NaN or crash on AVX-512 CPUs); the rest dequantize."""
    return (device.type == "cpu" and hasattr(torch, "_weight_int8pack_mm")
            and in_features % 16 == 0)


class Int8Linear(nn.Module):
    """y = (x Q^T) * s + b with Q int8 and s per output channel (the buffers weight_int8, scale)."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.gemm_rows = GEMM_ROWS  # from this many rows of x: W dequantized, one GEMM
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features,
                                                        dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        layer.weight_int8, layer.scale = quantize_rows(linear.weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone())
        return layer.to(linear.weight.device)

    def dequantized(self) -> torch.Tensor:
        return self.weight_int8.float() * self.scale[:, None]

    def scale_bf16(self) -> torch.Tensor:
        """s in bf16, as the kernel takes it: converted once, again only when s changes (a
        load_state_dict writes it in place, which bumps its version)."""
        if torch.compiler.is_compiling():  # the compiler folds the conversion itself
            return self.scale.to(torch.bfloat16)
        key = (self.scale.data_ptr(), self.scale._version, self.scale.device)
        if getattr(self, "_scale_key", None) != key:
            self._scale_bf16, self._scale_key = self.scale.to(torch.bfloat16), key
        return self._scale_bf16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _rows(x, self.in_features) >= self.gemm_rows:  # many rows: one GEMM
            if _int_gemm_fits(x):  # x rounded to 8 bits too, an integer GEMM
                flat = x.reshape(-1, self.in_features)
                y = int8_gemm(flat, self.weight_int8, self.scale)
                y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
            else:  # W ~ s Q in bf16, a bf16 GEMM
                w = workspace(self.weight_int8.shape, torch.bfloat16, x.device)
                w.copy_(self.weight_int8).mul_(self.scale_bf16()[:, None])
                y = F.linear(x.to(torch.bfloat16), w).to(x.dtype)
        elif _int8_kernel_fits(x.device, self.in_features):
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch._weight_int8pack_mm(flat, self.weight_int8, self.scale_bf16())
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)


class Int8Embedding(nn.Module):
    """Rows of s Q looked up by token id: E[i] ~ s_i Q_i."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim,
                                                        dtype=torch.int8))
        self.register_buffer("scale", torch.ones(num_embeddings))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.weight_int8[idx].float() * self.scale[idx][..., None]


def quantize_int8(model: nn.Module) -> list[str]:
    """Replace every Linear and Embedding of `model` by its int8 form, in place; a head tied to
    an embedding shares its Q and s. Returns the names replaced."""
    done: dict[int, nn.Module] = {}  # id(float weight) -> its int8 module, for tied weights
    names = []
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Embedding):
                new = Int8Embedding(child.num_embeddings, child.embedding_dim)
                new.weight_int8, new.scale = quantize_rows(child.weight)
                new.to(child.weight.device)
            elif isinstance(child, nn.Linear):
                new = Int8Linear.from_linear(child)
            else:
                continue
            shared = done.get(id(child.weight))
            if shared is not None:  # tied: one Q and s for both
                new.weight_int8, new.scale = shared.weight_int8, shared.scale
            done.setdefault(id(child.weight), new)
            setattr(parent, child_name, new)
            names.append(f"{parent_name}.{child_name}" if parent_name else child_name)
    return names


def weight_bytes(model: nn.Module) -> int:
    """Bytes of what the model saves (its parameters and persistent buffers), a tensor shared
    by two names counted once."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


INT4_GROUP = 32


def quantize_groups_int4(w: torch.Tensor, group: int = INT4_GROUP, chunk: int = 256
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit in groups of `group` along each row: (Q int32 (N, K) in [0, 15],
    d (N, K / group), m (N, K / group)) with W ~ d Q + m, m the group's minimum, Q =
    round((W - m) / d), d = (max - m) / 15. `chunk` rows at a time: the temporaries are a
    few hundred KB, not several copies of W (a load converting layer by layer peaked ~20 MB
    higher with them)."""
    N, K = w.shape
    q = torch.empty(N, K, dtype=torch.int32, device=w.device)
    d = torch.empty(N, K // group, device=w.device)
    low = torch.empty(N, K // group, device=w.device)
    for start in range(0, N, chunk):
        rows = slice(start, start + chunk)
        g = w[rows].detach().float().reshape(-1, K // group, group)
        torch.amin(g, -1, out=low[rows])
        d[rows] = ((g.amax(-1) - low[rows]) / 15).clamp_min_(1e-12)
        q[rows] = ((g - low[rows, :, None]) / d[rows, :, None]).round_().clamp_(0, 15).view(-1, K)
    return q, d, low


def _int4_kernel_fits(device: torch.device, in_features: int, out_features: int) -> bool:
    """The CPU kernel takes whole groups and rows a multiple of 16 (its packing refuses
    others)."""
    return (device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
            and in_features % INT4_GROUP == 0 and out_features % 16 == 0)


def _unpack_int4(packed: torch.Tensor, out_features: int, in_features: int,
                 out: torch.Tensor | None = None) -> torch.Tensor | None:
    """Q (N, K), values 0-15, from the CPU kernel's packing, for N a multiple of 64: blocks
    of 64 rows, each stored k by k as 32 bytes, byte i holding row i in its low four bits and
    row 32 + i in its high four (read off PyTorch 2.13's packing on an AVX-512 CPU; other
    builds may pack otherwise, so Int4Linear checks it against Q when it packs, and where it
    differs does without it). Written into `out` (N, K) of any dtype where given (a prompt's
    bf16 W: no other tensor made but this thread's nibble workspace), else a new uint8
    tensor. None for other N."""
    if out_features % 64:
        return None
    p = packed.view(out_features // 64, in_features, 32)
    if out is None:
        out = torch.empty(out_features, in_features, dtype=torch.uint8, device=p.device)
        nibbles = torch.empty_like(p)
    else:
        nibbles = workspace(p.shape, torch.uint8, p.device)
    rows = out.view(out_features // 64, 2, 32, in_features)  # (block, low/high, row, k)
    torch.bitwise_and(p, 0xF, out=nibbles)
    rows[:, 0].copy_(nibbles.transpose(1, 2))
    torch.bitwise_right_shift(p, 4, out=nibbles)
    rows[:, 1].copy_(nibbles.transpose(1, 2))
    return out


class Int4Linear(nn.Module):
    """y = x W^T + b with W ~ d Q + m, Q 4-bit in groups of 32 inputs. Where the kernel fits:
    buffers weight_int4 (Q as it packs it, two to a byte) and scales_and_zeros (bf16), 5 bits
    a weight as Q4_1's; elsewhere Q (int8) with d and m (fp32), multiplied as W."""

    def __init__(self, linear: nn.Linear, groups: tuple[torch.Tensor, ...] | None = None):
        """`groups`: quantize_groups_int4(linear.weight), where the caller has it (and has let
        the float weight go: infer/convert.py)."""
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        if self.in_features % INT4_GROUP:
            raise ValueError(f"int4 needs inputs in groups of {INT4_GROUP}; this layer has "
                             f"{self.in_features}")
        q, d, m = groups if groups is not None else quantize_groups_int4(linear.weight)
        self.gemm_rows = GEMM_ROWS  # from this many rows of x: W in bf16, one GEMM
        self.fits = _int4_kernel_fits(linear.weight.device, self.in_features, self.out_features)
        if self.fits:
            self.register_buffer("weight_int4",
                                 torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            self.register_buffer("scales_and_zeros", torch.stack(
                [d.t(), (m + 8 * d).t()], -1).contiguous().to(torch.bfloat16))
            self.unpacks = self._unpacks_to(q)
        else:
            self.register_buffer("weight_int4", q.to(torch.int8))
            self.register_buffer("d", d)
            self.register_buffer("m", m)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())

    def _unpacks_to(self, q: torch.Tensor, rows: int = 512) -> bool:
        """Whether _unpack_int4 reads Q back from this build's packing, `rows` rows at a time
        (blocks of 64: the check's temporaries stay small)."""
        N, K = self.out_features, self.in_features
        if N % 64:
            return False
        blocks = self.weight_int4.view(N // 64, -1)
        return all(torch.equal(_unpack_int4(blocks[start // 64:(start + rows) // 64],
                                            min(rows, N - start), K),
                               q[start:start + rows].to(torch.uint8))
                   for start in range(0, N, rows))

    def dequantized(self) -> torch.Tensor:
        """The W (out, in) the product uses, in fp32: where the kernel fits, its own product
        with the identity (its fp32 path: exact, and slow)."""
        if self.fits:
            return torch.ops.aten._weight_int4pack_mm_for_cpu(
                torch.eye(self.in_features), self.weight_int4, INT4_GROUP,
                self.scales_and_zeros.float()).t().contiguous()
        q = self.weight_int4.float().reshape(self.out_features, -1, INT4_GROUP)
        return (q * self.d[..., None] + self.m[..., None]).reshape(self.out_features, -1)

    def bf16_weight(self) -> torch.Tensor:
        """W ~ (Q - 8) scale + zero in bf16 (N, K), from the kernel's packing, written into
        this thread's workspaces of its shape: valid until the next call. No other tensor is
        made: a prompt's 120 layers unpacking through new tensors allocated ~300 MB in all,
        and the allocator kept ~20 MB of it resident."""
        N, K = self.out_features, self.in_features
        w = _unpack_int4(self.weight_int4, N, K,
                         out=workspace((N, K), torch.bfloat16, self.weight_int4.device))
        sz = self.scales_and_zeros  # (K / G, N, 2)
        groups = w.view(N, K // INT4_GROUP, INT4_GROUP)
        groups.sub_(8).mul_(sz[..., 0].t()[..., None]).add_(sz[..., 1].t()[..., None])
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fits and self.unpacks and _rows(x, self.in_features) >= self.gemm_rows:
            y = F.linear(x.to(torch.bfloat16), self.bf16_weight()).to(x.dtype)
        elif self.fits:  # bf16 activations: the kernel's fast path
            flat = x.reshape(-1, self.in_features).to(torch.bfloat16)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, INT4_GROUP,
                                                           self.scales_and_zeros)
            y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        else:
            y = F.linear(x, self.dequantized().to(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, group={INT4_GROUP}")
