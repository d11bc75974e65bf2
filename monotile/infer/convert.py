"""A model made ready for inference, one layer at a time (Run.optimize_for_inference, and
monotile.load(RUN, dtype=...), which reads the weights file as it goes):

    float32   W as trained, laid out for oneDNN where that measures faster (packed.py)
    bfloat16  W rounded to bf16 (the norms too), laid out likewise
    int8      every Linear and Embedding W ~ s Q, one scale per output (quantize.py)
    int4      every Linear whose inputs come in groups of 32 W ~ d Q + m; the head and the
              embeddings 8 bits, as int8's (llama.cpp's Q4 files keep token_embd in Q8_0)

int8 and int4 keep a text model's KV cache in bf16 (its trunk's cache_dtype), as llama.cpp
keeps its f16: half the memory of fp32's, and read by the attention kernel as it is. (Whisper's
decoder keeps its caches in fp32, as CTranslate2's int8 does.)

With the weights file (train/checkpoint.py's WeightReader) each layer's float weight is read
just before the layer is converted and let go right after, so the float model is never whole
in memory: a process decoding in int4 holds the 4-bit weights, not the fp32 ones first, as
llama.cpp holds what its file maps. A head tied to an embedding is converted first, while
little else is resident, from the file's pages a thousand rows at a time, each let go once
converted; the embedding then looks its rows up in the head's converted weight (bf16, int8
or int4's 8 bits; fp32's in the file's pages), no second copy. An embedding left in float
otherwise reads each lookup's rows from the file (FileEmbedding, with pread): none of its
pages is mapped, where a mapped row brings the page-cache folio about it (up to 2 MB).
"""

from __future__ import annotations

import ctypes
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import SelfAttention, attention
from ..core.transformer import Block
from . import native as native_kernels
from .native import (CHUNK_WEIGHTS, NativeEmbedding, NativeInt4Linear, NativeInt8Embedding,
                     NativeInt8Linear, NativeLinear)
from .packed import (PackedLinear, layouts, packing_available, pass_times, remembered,
                     rows_of)
from .quantize import (INT4_GROUP, Int4Linear, Int8Embedding, Int8Linear,
                       quantize_groups_int4, quantize_rows, tune_gemm_rows)

EIGHT_BITS = ("head",)  # int4 keeps these at 8 bits (llama.cpp's Q4 files keep the output too)
# the RoPE rotations an inference model keeps at first (Transformer.keep_positions): more are
# made as a longer sequence, or a KV cache for more positions, comes
ROPE_POSITIONS = 256


class FileEmbedding(nn.Module):
    """E[i] read from the weights file, cast to `dtype`: for inference, where a token reads one
    row of the table. `rows` (WeightReader.rows) reads each with pread, so nothing of the file
    is mapped into the process; `table`, the file's pages mapped (copy on write, never
    written), is what a compiled step looks up (and what saving writes)."""

    def __init__(self, table: torch.Tensor, dtype: torch.dtype,
                 rows: Callable[[torch.Tensor], torch.Tensor] | None = None):
        super().__init__()
        self.table, self.dtype, self.rows = table, dtype, rows
        self.num_embeddings, self.embedding_dim = table.shape

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if self.rows is None or torch.compiler.is_compiling():
            return F.embedding(idx, self.table).to(self.dtype)
        return self.rows(idx.cpu()).to(device=idx.device, dtype=self.dtype)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.table.to(self.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, dtype={self.dtype}, in the file"


def convert(model: nn.Module, dtype: str, rows: int | Mapping[str, int] = 1,
            weights=None, *, pack: bool = True, native: bool = False,
            compiler_packs: bool = True, fused_steps: bool = False) -> None:
    """Turn `model`'s layers into `dtype`'s forms (above), in place, one at a time, and put it
    in eval mode. `rows`: the rows of x a layer multiplies (packed.rows_of). `weights`: a
    WeightReader of a model built with its weights left unread; each is read when its layer
    is converted, the rest at the end. `pack=False` leaves the float layers plain nn.Linear
    (for torch.compile, which lays their weights out itself when it freezes them).
    `native`: the layers multiply in native.py's kernels (built, and loaded,
    before: native.available()); an fp32 one only where that measures faster than the compiled
    step's product, MKL's packed one where the compiler packs weights (`compiler_packs`:
    compile_decoding's `prepack`), else plain. `fused_steps` (with `native`, uncompiled): a
    pre-norm block's one-token step runs in one native call (native.block_step), its float
    layers all native."""
    float_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    plan = _plan(model)
    # the float layers in native kernels: bf16's (PyTorch's GEMV reads bf16 at half speed),
    # fp32's where they measure faster or their block's step is fused
    fused = ({id(m) for b in model.modules() if isinstance(b, Block) for m in b.modules()}
             if native and fused_steps else set())
    native_float = _native_shapes(plan, dtype, compiler_packs, fused) if native else set()
    # oneDNN's layouts measured for the others only (a fresh machine times each shape once)
    hints = _layouts(plan, dtype, rows, skip=native_float) if pack else {}
    shared: dict[tuple, nn.Module] = {}  # a float weight -> its converted layer (tied)
    # the native layouts laid out in one block, as the layers come (WeightBlock)
    block = _weight_block(plan, dtype) if native else None
    with torch.no_grad(), block.filling() if block is not None else nullcontext():
        while plan:
            parent, child_name, name, module = plan.pop(0)
            setattr(parent, child_name, _convert(module, name, dtype, float_dtype, rows, hints,
                                                 weights, shared, native, native_float))
            del module
            if weights is not None or block is not None:  # the float weight and the
                # temporaries given back: else the allocator keeps them, and memory grows as
                # it goes (the block is memory of its own, not the weights' freed room)
                release_free_memory()
        if weights is not None:
            weights.read_rest()
            # what is lent mapped in now, every other page let go: those mapped about the
            # reads, and a mapped table's
            weights.keep_only([*model.parameters(), *model.buffers()])
        trunk = getattr(model, "trunk", None)
        if hasattr(trunk, "keep_positions"):  # rotations made as positions are reached
            trunk.keep_positions(ROPE_POSITIONS)  # (before .to, which makes them anew: all
            # 8,192 of SmolLM2's took 9 MB of temporaries the allocator kept)
        if dtype == "bfloat16":
            model.to(torch.bfloat16)
    if dtype in ("int8", "int4") or native:  # a prompt's rows: the kernels or one GEMM
        tune_gemm_rows(model)
    if dtype in ("int8", "int4") and hasattr(trunk, "cache_dtype"):
        trunk.cache_dtype = torch.bfloat16  # K and V in 16 bits: half the cache's memory
    layers = [m for m in model.modules() if isinstance(m, SelfAttention) and not m.cross]
    if native:  # a decoding step's attention in the kernels too
        for module in layers:
            module.one_query = native_kernels.attend_one
    if native and fused_steps:  # and each block's whole step, where it can
        for module in model.modules():
            if isinstance(module, Block):
                module.one_token = native_kernels.block_step(module)
    sixteen = torch.bfloat16 if dtype == "bfloat16" else getattr(trunk, "cache_dtype", None)
    if layers and sixteen is not None and next(model.parameters()).device.type == "cpu":
        upcast = upcasting_wins(layers[0].n_head, layers[0].n_kv_head, layers[0].head_dim,
                                float_dtype, sixteen)
        for module in layers:
            module.upcast_cache = upcast
    model.eval()
    release_free_memory()


def _weight_block(plan, dtype: str) -> native_kernels.WeightBlock | None:
    """A WeightBlock with room for every layer of `plan` in its kernel layout (bytes a weight:
    fp32 4, bf16 2, int8 1, int4 5/8 (taken as 1); rows padded to eight), for CPU weights where
    the system maps memory so; None where it cannot (the layouts are then tensors of their own)."""
    size = 0
    for _, _, name, m in plan:
        if isinstance(m, nn.Linear) and m.weight.device.type == "cpu":
            each = (2 if dtype == "bfloat16" else 4) if _stays_float(m, name, dtype) else 1
            size += -(-m.out_features // 8) * 8 * m.in_features * each + 64
    if not size or not native_kernels.WeightBlock.available():
        return None
    try:
        return native_kernels.WeightBlock(size)
    except (OSError, ValueError, RuntimeError):  # no room to map (a 32-bit process, limits)
        return None


def upcasting_wins(heads: int, kv_heads: int, head_dim: int, q_dtype: torch.dtype,
                   cache_dtype: torch.dtype, positions: int = 256) -> bool:
    """Whether PyTorch's attention kernel takes one query against `positions` cached keys
    and values in `cache_dtype` faster with them cast to fp32 first than as they are: measured
    once per machine and shape, and kept (layouts.json). On an Intel Xeon with AMX it read
    bf16 as it is in 20 us (SmolLM2's 9 heads of 64 over 300 positions), 46 cast first; on an
    AMD EPYC the bf16 path took 116 us over 220, the cast and fp32 one 36."""
    shape = (heads, kv_heads, head_dim)
    key = (f"attention {heads}/{kv_heads}x{head_dim} q {str(q_dtype).removeprefix('torch.')}"
           f" cache {str(cache_dtype).removeprefix('torch.')}: fp32 vs as it is")

    def measure() -> dict[tuple, int]:
        q = torch.randn(1, heads, 1, head_dim, dtype=q_dtype)
        k, v = (torch.randn(1, kv_heads, positions, head_dim).to(cache_dtype) for _ in "kv")
        ways = {0: lambda _: attention(q, k, v),
                1: lambda _: attention(q, k.float(), v.float())}
        with torch.no_grad():  # 20 calls each a pass, best of 5 passes
            best = pass_times([(way, f, None) for way, f in ways.items() for _ in range(20)], 5)
        return {shape: int(best[1] < best[0])}
    return bool(remembered({shape: key}, measure)[shape])


def _layouts(plan, dtype: str, rows, skip=frozenset()) -> dict[tuple, int]:
    """{(in, out, rows): layout} of the layers that stay in float (packed.layouts: 0 plain,
    else a packing's row hint), but for the (in, out) shapes in `skip` (native ones), measured
    once per machine on layers of random weights, before any real weight is read."""
    float_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    shapes = Counter((m.in_features, m.out_features, rows_of(name, rows))
                     for _, _, name, m in plan if _stays_float(m, name, dtype)
                     and (m.in_features, m.out_features) not in skip
                     and packing_available(m.weight.device, float_dtype))
    return layouts(shapes, float_dtype) if shapes else {}


def _native_shapes(plan, dtype: str, compiler_packs: bool, fused: set[int] = frozenset()
                   ) -> set[tuple[int, int]]:
    """(in, out) of the float layers to multiply in native.py's kernels: every bf16 one, every
    one of a block whose step is fused (`fused`: the ids of those blocks' modules; one call
    saves more than any kernel's few percent), and the other fp32 ones whose shape measures
    faster there than the compiled step's own product (native.float32_native_shapes)."""
    shapes = Counter((m.in_features, m.out_features) for _, _, name, m in plan
                     if _stays_float(m, name, dtype) and m.in_features % 2 == 0)
    if dtype == "bfloat16" or not shapes:
        return set(shapes)
    in_fused = {(m.in_features, m.out_features) for *_, m in plan if id(m) in fused}
    in_fused &= set(shapes)
    rest = Counter({shape: count for shape, count in shapes.items() if shape not in in_fused})
    return in_fused | (native_kernels.float32_native_shapes(rest, compiler_packs) if rest
                       else set())


def packing_wins(model: nn.Module, dtype: str, rows: int | Mapping[str, int] = 1) -> bool:
    """Whether any layer `model` keeps in float in `dtype` is faster packed than plain on
    this CPU (its measured layout); False when none stays in float."""
    return any(_layouts(_plan(model), dtype, rows).values())


def _plan(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """(parent, name there, full name, layer) of every Linear and Embedding; a layer whose
    weight an embedding shares (a tied head) first."""
    layers, tables = [], set()
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, (nn.Linear, nn.Embedding)):
                name = f"{parent_name}.{child_name}" if parent_name else child_name
                layers.append((parent, child_name, name, child))
                if isinstance(child, nn.Embedding):
                    tables.add(_key(child.weight))
    tied = [entry for entry in layers
            if isinstance(entry[3], nn.Linear) and _key(entry[3].weight) in tables]
    return tied + [entry for entry in layers if entry not in tied]


def _key(t: torch.Tensor) -> tuple:
    return (t.data_ptr(), tuple(t.shape))


def _stays_float(module: nn.Module, name: str, dtype: str) -> bool:
    if type(module) is not nn.Linear:
        return False
    if dtype == "int8":
        return False
    if dtype == "int4":
        return name not in EIGHT_BITS and module.in_features % INT4_GROUP != 0
    return True


def _convert(module, name, dtype, float_dtype, rows, hints, weights, shared,
             native=False, native_float=frozenset()) -> nn.Module:
    key = _key(module.weight)
    source, release = _source(module, weights)
    if isinstance(module, nn.Embedding):  # a tied head's form, converted first, is shared
        twin = shared.get(key)
        if isinstance(twin, NativeInt8Linear):
            return NativeInt8Embedding(twin)
        if isinstance(twin, NativeLinear):
            return NativeEmbedding(twin, float_dtype)
        if type(twin) is nn.Linear:  # a plain head (bf16, or fp32 in the file's pages)
            module.weight = twin.weight
            return module
        if dtype in ("int8", "int4"):  # int4 too: 8 bits, as llama.cpp's Q4 files keep it
            with torch.device("meta"):  # its buffers come from _int8: none allocated here
                new = Int8Embedding(*source.shape)
            return _int8(module, source, release, shared, new)
        if source is not module.weight:  # left in the file, each lookup's rows read from it
            return FileEmbedding(source, float_dtype, weights.rows(source))
        return module
    if dtype == "int8" or (dtype == "int4" and name in EIGHT_BITS):
        twin = shared.get(key)
        if isinstance(twin, NativeInt8Linear):  # a second layer on one weight
            return NativeInt8Linear(twin.packed, twin.scale, twin.out_features, module.bias)
        with torch.device("meta"):
            new = Int8Linear(module.in_features, module.out_features, module.bias is not None)
        new = _int8(module, source, release, shared, new)
        if native and module.in_features % native_kernels.GROUP == 0:
            new = NativeInt8Linear(native_kernels.pack_q8(new.weight_int8), new.scale,
                                   module.out_features, new.bias)
            shared[key] = new
        else:  # s in bf16 made now, beside the weights: made at the first call, inside a
            # prompt's prefill, the 120 small tensors land between its large temporaries and
            # keep the heap from giving their room back (int8 SmolLM2 peaked at 425-432 MiB
            # in half the runs, 418 at most with them made here)
            new.scale_bf16()
        return new
    if dtype == "int4" and type(module) is nn.Linear and module.in_features % INT4_GROUP == 0:
        if native:  # a few hundred rows at a time, each let go once packed
            return NativeInt4Linear(source, module.bias, release)
        groups = quantize_groups_int4(source)
        release(source)  # before packing: the float pages and Q are not resident together
        return Int4Linear(module, groups)
    if not _stays_float(module, name, dtype):  # left as it is (a LoRA layer, say)
        if source is not module.weight:
            module.weight = nn.Parameter(source, requires_grad=False)
        return module
    if (module.in_features, module.out_features) in native_float:  # (else, for the compiler
        # a plain fp32 layer, which it lays out for MKL itself when it freezes it)
        new = NativeLinear(source, module.bias, float_dtype, release)
        shared[key] = new
        return new
    hint = hints.get((module.in_features, module.out_features, rows_of(name, rows)), 0)
    if hint:
        new = PackedLinear(source.to(float_dtype), module.bias, hint).eval()
        release(source)
        return new
    if source.dtype != float_dtype:  # plain, cast here (a bf16 copy; the float pages let go)
        weight = source.to(float_dtype)
        release(source)
        shared[key] = module  # a tied embedding looks its rows up here, not in the file
    elif source is not module.weight:  # plain, in the file's pages (copy on write)
        weight = source
        shared[key] = module  # a tied embedding looks its rows up in the same pages
    else:
        return module
    module.weight = nn.Parameter(weight, requires_grad=False)
    return module


def _source(module: nn.Module, weights) -> tuple[torch.Tensor, Callable]:
    """(the layer's float weight, a function that lets a read part of it go): the file's pages
    where the weights file is given and can lend them, else the layer's own weight, read."""
    weight = module.weight
    if weights is None:
        return weight, lambda part: None
    weights.read_module(module, skip=weight)
    mapped = weights.mapped(weight)
    if mapped is None:
        weights.read_module(module)
        return weight, lambda part: None
    return mapped, weights.release


def _int8(module, source, release, shared, new):
    """`new` (an Int8Linear or Int8Embedding) holding module's weight as Q and s, quantized
    about CHUNK_WEIGHTS weights at a time (its temporaries a few MB, not the weight's size:
    with 1,024 rows of SmolLM2's 576 inputs at a time, the allocator kept ~8 MB of them a
    layer until the layer was done); one Q and s
    for layers that share a weight (tied)."""
    key = _key(module.weight)
    if key in shared:
        new.weight_int8, new.scale = shared[key].weight_int8, shared[key].scale
    else:
        q = torch.empty(source.shape, dtype=torch.int8, device=source.device)
        s = torch.empty(source.shape[0], device=source.device)
        rows = max(1, CHUNK_WEIGHTS // source.shape[1])
        for start in range(0, source.shape[0], rows):
            part = source[start:start + rows]
            q[start:start + rows], s[start:start + rows] = quantize_rows(part)
            release(part)
        new.weight_int8, new.scale = q, s
        shared[key] = new
    if isinstance(module, nn.Linear) and module.bias is not None:
        new.bias = nn.Parameter(module.bias.detach().clone(), requires_grad=False)
    return new


def release_free_memory() -> None:
    """Give the C allocator's free pages back to the system (glibc's malloc_trim; nothing
    elsewhere): the float weights let go while converting, and the tokenizer's parse, would
    otherwise stay resident (~15 MB of SmolLM2's tokenizer alone)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError, TypeError):
        pass
