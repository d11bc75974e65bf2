"""Matrix-vector kernels for 4- and 8-bit weights, in C++ (kernels.cpp), built for this CPU.

Decoding one token reads every weight once. PyTorch's weight-only kernels turn each weight
back into a float and multiply in floating point; llama.cpp instead rounds x to 8 bits too,
in blocks of 32, and multiplies integers, four byte products summed per instruction (AVX-VNNI,
AVX512-VNNI; AVX2's maddubs elsewhere). These kernels do the same:

    x_b ~ dx_b qx_b               qx_b int8, dx_b = max|x_b| / 127   (each block b of 32 inputs)
    int4   y_r = sum_b d_rb dx_b (Q_rb . qx_b) + m_rb dx_b sum(qx_b)    (W ~ d Q + m, Q4_1)
    int8   y_r = s_r sum_b dx_b (Q_rb . qx_b)                           (W ~ s Q per row)

with eight rows interleaved four bytes at a time, so that one 8-lane instruction advances
eight rows, their block scales are one vector, and no row needs a horizontal sum. The int4
layout holds, per eight rows and block: their d and m in fp16, then 128 bytes of nibbles
(5 bits a weight, as Q4_1).

The C++ is compiled on first use with the machine's C++ compiler for this CPU
(`-march=native`: its widest integer dot products), a few seconds, and kept in
~/.cache/monotile/kernels keyed by the source, PyTorch's version and the CPU. `available()`
says whether they could be built; callers fall back to PyTorch's kernels when not.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SOURCE = Path(__file__).with_name("kernels.cpp")
ROWS = 8        # rows interleaved
GROUP = 32      # inputs a block
# weights converted at once as a layer is laid out from the file's pages (0.5 MB in fp32): its
# temporaries a few of that, each piece's pages let go before the next is read
CHUNK_WEIGHTS = 1 << 17
Q4_BYTES = 160  # a block of 8 rows in int4: d[8] and m[8] in fp16, 128 bytes of nibbles

_lock = threading.Lock()
_state: dict[str, object] = {}


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    keep = [line for line in info.splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _library_path() -> Path:
    from ..data import cache_dir
    key = hashlib.sha256("\n".join([SOURCE.read_text(), torch.__version__, _cpu_id(),
                                    sys.platform]).encode()).hexdigest()[:16]
    return cache_dir() / "kernels" / f"monotile_kernels-{key}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler ({compiler})")
    root = Path(torch.__file__).parent
    command = [compiler, "-O3", "-march=native", "-fopenmp", "-std=c++20", "-fPIC", "-shared",
               "-w", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
               f"-I{root / 'include'}", str(SOURCE), f"-L{root / 'lib'}", "-lc10",
               "-ltorch_cpu", f"-Wl,-rpath,{root / 'lib'}"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # another process may build too
        built = Path(tmp) / target.name
        done = subprocess.run([*command, "-o", str(built)], capture_output=True, text=True,
                              timeout=600)
        if done.returncode:
            raise RuntimeError((done.stderr.strip().splitlines() or ["failed"])[-1][:300])
        os.replace(built, target)  # whole or not at all


def available() -> bool:
    """Build (once per machine) and load the kernels; False, with the reason in `reason()`,
    where they cannot be: no C++ compiler, not a CPU build of x86 or Arm, a failing build."""
    with _lock:
        if "ok" not in _state:
            try:
                target = _library_path()
                if not target.exists():
                    _build(target)
                torch.ops.load_library(str(target))
                _register_fakes()
                _state["ok"] = True
            except Exception as e:  # noqa: BLE001  (any reason means: use PyTorch's kernels)
                _state["ok"], _state["reason"] = False, str(e)
        return bool(_state["ok"])


def reason() -> str:
    return str(_state.get("reason", ""))


def _register_fakes() -> None:
    """Output shapes for torch.compile, which traces the ops without running them."""
    @torch.library.register_fake("monotile::q4_linear")
    def _(x, w, n):
        return x.new_empty((x.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("monotile::q8_linear")
    def _(x, w, scale, n):
        return x.new_empty((x.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("monotile::float_linear")
    def _(x, w, n):
        return x.new_empty((x.shape[0], n), dtype=torch.float32)

    @torch.library.register_fake("monotile::attend_one")
    def _(q, k, v):
        return q.new_empty(q.shape, dtype=torch.float32)

    @torch.library.register_fake("monotile::decode_block")
    def _(x, w, k_cache, v_cache, rope, pos, n, n_head, n_kv_head, layer_norm, mlp, eps):
        return torch.empty_like(x)


def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q (N, K) in [0, 15], d and m (N, K/32) -> the kernels' int4 layout (N/8, K/32, 160)
    uint8 (N padded to a multiple of 8 with zero rows): per 8 rows and block, d[8] and m[8]
    in fp16, then four 32-byte chunks c whose byte 4r + j holds row r's input 4c + j in its
    low four bits and input 16 + 4c + j in its high four."""
    return _laid_out(_q4_layout(q, d, m))


def _q4_layout(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    q, d, m = _pad_rows(q.to(torch.uint8)), _pad_rows(d.float()), _pad_rows(m.float())
    N, K = q.shape
    groups, blocks = N // ROWS, K // GROUP
    qr = q.view(groups, ROWS, blocks, 2, 4, 4)  # (group, row, block, half, chunk, byte)
    nibbles = (qr[:, :, :, 0] | (qr[:, :, :, 1] << 4)).permute(0, 2, 3, 1, 4)
    scales = [t.half().view(groups, ROWS, blocks).transpose(1, 2).contiguous()
              .view(torch.uint8) for t in (d, m)]
    return torch.cat([*scales, nibbles.reshape(groups, blocks, 128)], -1)


def quantize_pack_q4(w: torch.Tensor, release=None, chunk: int = CHUNK_WEIGHTS
                     ) -> torch.Tensor:
    """pack_q4(*quantize_groups_int4(w)), whole groups of ROWS rows of about `chunk` weights
    at a time, each written into its rows of the layout and then given to `release` (the
    weights file's pages let go). The temporaries are a few of a chunk's size, 0.5 MB, not W's
    int32 Q (SmolLM2's gate_up: 7 MB) beside W's own pages: those a loading process's last
    layer took lifted its peak above its decoding one (by ~15 MB; with 256 rows of 1536
    inputs, 1.5 MB each, the allocator kept 8 MB of them)."""
    from .quantize import quantize_groups_int4
    N, K = w.shape
    out = _empty_laid_out((-(-N // ROWS), K // GROUP, 160), torch.uint8)
    rows = max(1, chunk // K // ROWS) * ROWS
    for start in range(0, N, rows):
        part = w[start:start + rows]
        out[start // ROWS:(start + part.shape[0] + ROWS - 1) // ROWS] = \
            _q4_layout(*quantize_groups_int4(part, chunk=rows))
        if release is not None:
            release(part)
    return out


def unpack_q4(packed: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """pack_q4's inverse: (Q uint8 (n, K), d (n, K/32) fp16, m (n, K/32) fp16)."""
    groups, blocks, _ = packed.shape
    d, m = (packed[..., i * 16:(i + 1) * 16].contiguous().view(torch.float16)  # (g, b, 8)
            .transpose(1, 2).reshape(groups * ROWS, blocks)[:n] for i in (0, 1))
    nib = packed[..., 32:].reshape(groups, blocks, 4, ROWS, 4).permute(0, 3, 1, 2, 4)
    q = torch.stack([nib & 0xF, nib >> 4], 3)  # (group, row, block, half, chunk, byte)
    return q.reshape(groups * ROWS, blocks * GROUP)[:n], d, m


def pack_q8(q: torch.Tensor) -> torch.Tensor:
    """Q (N, K) int8 -> the kernels' int8 layout (N/8, K/32, 256): per 8 rows and block,
    eight 32-byte chunks c whose byte 4r + j holds row r's input 4c + j."""
    q = _pad_rows(q)
    N, K = q.shape
    groups, blocks = N // ROWS, K // GROUP
    return (_laid_out(q.view(groups, ROWS, blocks, 8, 4).permute(0, 2, 3, 1, 4))
            .view(groups, blocks, ROWS * GROUP))


def q8_rows(packed: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of the Q that pack_q8 packed: (*idx.shape, K) int8."""
    groups, blocks, _ = packed.shape
    five = packed.view(groups, blocks, 8, ROWS, 4)
    rows = five[idx // ROWS, :, :, idx % ROWS]  # (*idx, block, chunk, byte)
    return rows.reshape(*idx.shape, blocks * GROUP)


def unpack_q8(packed: torch.Tensor, n: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """pack_q8's inverse: Q (n, K) int8 (one strided copy, not a gather of every row), written
    into `out` (N padded, K) where given."""
    groups, blocks, _ = packed.shape
    rows = packed.view(groups, blocks, 8, ROWS, 4).permute(0, 3, 1, 2, 4)
    if out is None:
        return rows.reshape(groups * ROWS, blocks * GROUP)[:n]
    out.view(groups, ROWS, blocks, 8, 4).copy_(rows)
    return out[:n]


def pack_float(w: torch.Tensor, dtype: torch.dtype, release=None,
               chunk: int = CHUNK_WEIGHTS) -> torch.Tensor:
    """W (N, K) -> the kernels' float layout: fp32 (N/8, K, 8), row r of eight in lane r;
    bf16 (N/8, K/2, 8, 2), inputs 2j and 2j + 1 of a row side by side in one 32-bit lane.
    Laid out in groups of ROWS rows of about `chunk` weights, each then given to `release`
    (as quantize_pack_q4: a bf16 copy of the whole W made no temporary beside W's pages)."""
    N, K = w.shape
    shape = (-(-N // ROWS), K // 2, ROWS, 2) if dtype == torch.bfloat16 else \
        (-(-N // ROWS), K, ROWS)
    out = _empty_laid_out(shape, dtype)
    rows = max(1, chunk // K // ROWS) * ROWS
    for start in range(0, N, rows):
        part = w[start:start + rows]
        p = _pad_rows(part.detach().to(dtype))
        g = p.shape[0] // ROWS
        out[start // ROWS:start // ROWS + g] = (
            p.view(g, ROWS, K // 2, 2).permute(0, 2, 1, 3) if dtype == torch.bfloat16
            else p.view(g, ROWS, K).transpose(1, 2))
        if release is not None:
            release(part)
    return out


def float_rows(packed: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows `idx` of the W that pack_float packed: (*idx.shape, K)."""
    if packed.dim() == 4:
        return packed[idx // ROWS, :, idx % ROWS, :].flatten(-2)
    return packed[idx // ROWS, :, idx % ROWS]


def attend_one(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for one query a head (a decoding step), q (B, H, 1, d)
    against k, v (B, Hkv, T, d) in fp32 or bf16 (a cache's first T positions, read in place,
    each K/V head serving H / Hkv query heads): fp32 (B, H, 1, d). Over 220 positions of
    SmolLM2's 9 heads of 64 on 2 threads: 12 us, against 26 in PyTorch's fused kernel (fp32)
    and 127 (bf16, on an AMD EPYC: its bf16 path is made for blocks of many queries)."""
    return torch.ops.monotile.attend_one(q, k, v)


HUGE_PAGE = 2 << 20
NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000 if sys.platform.startswith("linux") else 0)


class WeightBlock:
    """One block of memory for a model's packed weights, laid in the order the layers are
    converted (a decoding step's order), on 2 MB pages where the system gives them to a
    mapping that asks (Linux's transparent huge pages, `madvise`; llama.cpp likewise keeps
    its weights in one buffer). A token's products then stream one region instead of ~120
    allocations scattered over 4 KB pages: SmolLM2's uncompiled step on an AMD EPYC, the model
    loaded both ways in one process, took fp32 12.6 ms against 17.0, bf16 7.2 against 8.3,
    int8 5.3 against 5.8, int4 4.1 against 4.4. `capacity` is an upper bound, reserved, not
    resident: a page counts once a weight is written onto it."""

    def __init__(self, capacity: int):
        # reserved without counting against the system's commit limit (MAP_NORESERVE): only
        # what is written becomes memory
        self.map = mmap.mmap(-1, capacity + HUGE_PAGE,
                             flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | NORESERVE)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self.map.madvise(mmap.MADV_HUGEPAGE)
        whole = torch.frombuffer(self.map, dtype=torch.uint8)
        start = -whole.data_ptr() % HUGE_PAGE  # from a page boundary: every 2 MB a whole page
        self.bytes = whole[start:start + capacity]
        self.used = 0

    @classmethod
    def available(cls) -> bool:
        return hasattr(mmap, "MAP_PRIVATE") and hasattr(mmap, "MAP_ANONYMOUS")

    def holds(self, t: torch.Tensor) -> bool:
        base = self.bytes.data_ptr()
        return base <= t.data_ptr() < base + self.bytes.numel()

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
        """A tensor of `shape` on the next free bytes (64-byte aligned); None when full."""
        n = math.prod(shape) * dtype.itemsize
        start = -(-self.used // 64) * 64
        if start + n > self.bytes.numel():
            return None
        self.used = start + n
        return self.bytes[start:start + n].view(dtype).view(shape)

    @contextmanager
    def filling(self):
        """Inside, the pack_* functions lay their layouts out here (this thread's)."""
        before, _filling.block = getattr(_filling, "block", None), self
        try:
            yield self
        finally:
            _filling.block = before


_filling = threading.local()


def _laid_out(t: torch.Tensor) -> torch.Tensor:
    """`t` (a permuted view) written out contiguous: into the WeightBlock being filled, else
    into a tensor of its own."""
    return _empty_laid_out(tuple(t.shape), t.dtype).copy_(t)


def _empty_laid_out(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A tensor of `shape` in the WeightBlock being filled, else one of its own."""
    block = getattr(_filling, "block", None)
    out = block.empty(shape, dtype) if block is not None else None
    return torch.empty(shape, dtype=dtype) if out is None else out


MLPS = {"swiglu": 0, "gelu": 1, "gelu_tanh": 2}  # decode_block's codes


def block_step(block: nn.Module):
    """A pre-norm Block's one-token decoding step in one call of kernels.cpp's decode_block,
    (x (B, 1, d), cache, pos, rope) -> the block's output, as Block.forward computes it in
    ~50 operators (h = x + wo(attend(rope(qkv(norm1(x))), cache)), out = h + mlp(norm2(h)));
    None where the block is not one it runs: a post-norm or cross-attention block, or a layer
    not in these kernels' layouts (a LoRA adapter, a plain nn.Linear). SmolLM2's fp32 step
    on 2 threads of an AMD EPYC: 30 ms in the operators, most of it their dispatch."""
    from ..core.layers import GeluMLP, LayerNorm, RMSNorm, SwiGLU
    attn, mlp = block.attn, block.mlp
    if isinstance(mlp, SwiGLU):
        layers, kind = (mlp.gate_up, mlp.down), MLPS["swiglu"]
    elif isinstance(mlp, GeluMLP):
        layers = (mlp.fc1, mlp.fc2)
        kind = MLPS["gelu_tanh" if mlp.approximate == "tanh" else "gelu"]
    else:
        return None
    layers = (attn.qkv, attn.wo, *layers)
    norms = (block.norm1, block.norm2)
    if (block.post_norm or block.cross_attn is not None
            or not all(isinstance(m, _NativeLayer) for m in layers)
            or not all(type(m) is type(norms[0]) for m in norms)
            or type(norms[0]) not in (RMSNorm, LayerNorm) or norms[0].eps != norms[1].eps):
        return None
    none = torch.empty(0)

    def as_float(t):
        return none if t is None else t.detach().float().contiguous()
    tensors = []
    for norm, pair in ((norms[0], layers[:2]), (norms[1], layers[2:])):
        tensors += [as_float(norm.weight), as_float(getattr(norm, "bias", None))]
        for m in pair:
            tensors += [m.packed, getattr(m, "scale", none), as_float(m.bias)]
    sizes = [m.out_features for m in layers]
    H, Hkv, eps = attn.n_head, attn.n_kv_head, float(norms[0].eps)
    layer_norm = isinstance(norms[0], LayerNorm)

    def step(x, cache, pos: int | torch.Tensor, rope):
        """pos an int for every row, rope (1, heads, d/2, 2); or pos (B,) a position a row
        (Transformer._forward_rows), rope (B, 1, heads, d/2, 2)."""
        if torch.is_tensor(pos):
            positions = pos.tolist()
            table = none if rope is None else rope.reshape(x.size(0), -1).contiguous()
        else:
            positions = [pos]
            table = none if rope is None else rope[0]
        return torch.ops.monotile.decode_block(x, tensors, cache.k, cache.v, table, positions,
                                               sizes, H, Hkv, layer_norm, kind, eps)
    return step


def _pad_rows(t: torch.Tensor) -> torch.Tensor:
    extra = -t.shape[0] % ROWS
    return t if not extra else torch.cat([t, t.new_zeros(extra, *t.shape[1:])])


class _NativeLayer(nn.Module):
    """y = x W^T + b with W held in one of the kernels' layouts: a few rows of x through the
    layout's kernel (`product`), a prompt's many rows (from gemm_rows, which
    quantize.tune_gemm_rows measures) through W as a plain (N, K) matrix again
    (`plain_weight`) and one GEMM."""

    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None,
                 bias_dtype: torch.dtype = torch.float32):
        from .quantize import GEMM_ROWS
        super().__init__()
        self.out_features, self.in_features = out_features, in_features
        self.gemm_rows = GEMM_ROWS  # quantize.tune_gemm_rows measures it for this machine
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(bias_dtype).clone(),
                                                            requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)
        y = self.many(flat) if flat.shape[0] >= self.gemm_rows else self.product(flat)
        y = y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def many(self, flat: torch.Tensor) -> torch.Tensor:
        """A prompt's rows: W as a plain matrix again and one GEMM."""
        w = self.plain_weight()
        return F.linear(flat.to(w.dtype), w)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, packed={tuple(self.packed.shape)}, native")


class NativeInt4Linear(_NativeLayer):
    """W ~ d Q + m in 4-bit blocks of 32 (Q4_1), in pack_q4's layout; q4_linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, release=None):
        """`release`: given each part of `weight` once it is packed (quantize_pack_q4:
        infer/convert.py lets the file's pages go)."""
        super().__init__(*weight.shape, bias)
        self.register_buffer("packed", quantize_pack_q4(weight, release))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q, d, m = unpack_q4(self.packed, self.out_features)
        w = q.view(self.out_features, -1, GROUP).to(dtype)
        return (w * d[..., None].to(dtype) + m[..., None].to(dtype)).view(self.out_features, -1)

    def plain_weight(self) -> torch.Tensor:
        return self.dequantized(torch.bfloat16)

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.monotile.q4_linear(flat, self.packed, self.out_features)


class NativeInt8Linear(_NativeLayer):
    """W ~ s Q with Q int8 in pack_q8's layout and s per output row (padded); q8_linear."""

    def __init__(self, packed: torch.Tensor, scale: torch.Tensor, out_features: int,
                 bias: torch.Tensor | None):
        super().__init__(out_features, packed.shape[1] * GROUP, bias)
        self.register_buffer("packed", packed)
        self.register_buffer("scale", _pad_rows(scale.float()).contiguous())

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = unpack_q8(self.packed, self.out_features)
        return q.to(dtype) * self.scale[:self.out_features, None].to(dtype)

    def plain_weight(self) -> torch.Tensor:
        return self.dequantized(torch.bfloat16)

    def many(self, flat: torch.Tensor) -> torch.Tensor:
        """A prompt's rows rounded to 8 bits and one integer GEMM with Q (quantize.int8_gemm,
        as llama.cpp's Q8_0 prompt rounds them), Q unpacked into this thread's workspace."""
        from .quantize import _int_gemm_fits, int8_gemm, workspace
        if not _int_gemm_fits(flat):
            return super().many(flat)
        groups, blocks, _ = self.packed.shape
        N = self.out_features
        q = unpack_q8(self.packed, N, workspace((groups * ROWS, blocks * GROUP), torch.int8,
                                                self.packed.device))
        return int8_gemm(flat, q, self.scale[:N])

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.monotile.q8_linear(flat, self.packed, self.scale, self.out_features)


class NativeInt8Embedding(nn.Module):
    """E[i] ~ s_i Q_i, the rows read out of pack_q8's layout (shared with a tied head)."""

    def __init__(self, head: NativeInt8Linear):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("packed", head.packed)
        self.register_buffer("scale", head.scale)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return q8_rows(self.packed, idx).float() * self.scale[idx][..., None]


class NativeLinear(_NativeLayer):
    """W (fp32 or bf16) in pack_float's layout; float_linear (fp32 sums, x in fp32)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                 release=None):
        """`release`: given each part of `weight` once it is laid out (pack_float)."""
        super().__init__(*weight.shape, bias, dtype)
        self.register_buffer("packed", pack_float(weight, dtype, release))

    def plain_weight(self) -> torch.Tensor:
        """W as (N, K) again, written into this thread's workspace of its shape."""
        from .quantize import workspace
        groups, K = self.packed.shape[0], self.in_features
        w = workspace((groups * ROWS, K), self.packed.dtype, self.packed.device)
        if self.packed.dim() == 4:
            w.view(groups, ROWS, K // 2, 2).copy_(self.packed.permute(0, 2, 1, 3))
        else:
            w.view(groups, ROWS, K).copy_(self.packed.transpose(1, 2))
        return w[:self.out_features]

    def product(self, flat: torch.Tensor) -> torch.Tensor:
        return torch.ops.monotile.float_linear(flat, self.packed, self.out_features)


def float32_native_shapes(shapes: Mapping[tuple[int, int], int], compiler_packs: bool
                          ) -> set[tuple[int, int]]:
    """Of {(in, out): count} fp32 layer shapes, those whose one-row product is faster in
    float_linear than in the way the compiled step would multiply it otherwise: MKL's packed
    SGEMM where the compiler packs its frozen weights (`compiler_packs`, and PyTorch built with
    MKL), else plain F.linear (MKL's or OpenBLAS's GEMV). Which wins depends on the processor
    and the shape (on one Intel Xeon, most of SmolLM2's layers 5-15 % faster here than in
    MKL's packed product, its 49,152-row head 10-20 % slower), and on where the weights come
    from: a shape timed alone sits in a large last-level cache, so the shapes are timed as a
    model runs them, layer after layer in their counts (time_float32_ways; bench/
    layouts.py prints them). Measured once per machine and shape; the verdicts are kept
    beside packed.layouts' (float32_key)."""
    from .packed import fastest
    other = "mkl" if compiler_packs and torch._C.has_mkl else "plain"
    ways = {name: _float32_maker(name) for name in (other, "native")}  # a tie: the compiler's
    verdicts = fastest({(n_in, n_out, 1): count for (n_in, n_out), count in shapes.items()},
                       ways, lambda way, shape: int(way == "native"),
                       lambda shape, count: float32_key(shape[:2], count, other))
    return {shape[:2] for shape, verdict in verdicts.items() if verdict}


def float32_key(shape: tuple[int, int], count: int, other: str) -> str:
    """The name float32_native_shapes keeps a shape's verdict under in layouts.json."""
    return f"{count} x {shape[0]}->{shape[1]} float32 native vs {other}"


# y = x W^T one row at a time, three ways: each maker takes W (out, in) fp32, lays it out as its
# way needs, and returns the product as a function of x (1, in)
FLOAT32_WAYS = {
    "plain": lambda w: (lambda x: F.linear(x, w)),
    "mkl": lambda w: (lambda x, p=torch.ops.mkl._mkl_reorder_linear_weight(w, 1):
                      torch.ops.mkl._mkl_linear(x, p, w, None, 1)),
    "native": lambda w: (lambda x, p=pack_float(w, torch.float32), n=w.shape[0]:
                         torch.ops.monotile.float_linear(x, p, n)),
}


def time_float32_ways(shapes: Mapping[tuple[int, int], int], names: tuple[str, ...]
                      ) -> dict[str, dict[tuple[int, int], float]]:
    """{way: {shape: seconds a pass spends in that shape's layers}} for FLOAT32_WAYS `names`,
    one row of x through {(in, out): count} layers in a model's order (packed.time_ways: at
    most MEASURED_BYTES of random weights in all, best of five passes)."""
    from .packed import time_ways
    times = time_ways({(n_in, n_out, 1): count for (n_in, n_out), count in shapes.items()},
                      {name: _float32_maker(name) for name in names})
    return {name: {shape[:2]: t for shape, t in by_shape.items()}
            for name, by_shape in times.items()}


def _float32_maker(name: str):
    """FLOAT32_WAYS[name] as time_ways makes layers: W, shape -> the product."""
    return lambda w, shape: FLOAT32_WAYS[name](w)


class NativeEmbedding(nn.Module):
    """E[i]: rows read out of a tied head's pack_float layout."""

    def __init__(self, head: NativeLinear, dtype: torch.dtype):
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.register_buffer("packed", head.packed)
        self.dtype = dtype

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return float_rows(self.packed, idx).to(self.dtype)
