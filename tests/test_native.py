"""The C++ matrix-vector kernels (infer/native.py, kernels.cpp) against their formulas written
in plain torch: x rounded to 8 bits in blocks of 32, integer products, the block scales; and
the layers that hold them against the layers they replace."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from monotile.infer import native
from monotile.infer.quantize import GEMM_ROWS, quantize_groups_int4, quantize_rows

pytestmark = pytest.mark.skipif(not native.available(),
                                reason=f"the kernels could not be built: {native.reason()}")


def quantized_x(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (qx (M, K/32, 32), dx (M, K/32)): dx = max|x_b| / 127, qx = round(x / dx)."""
    blocks = x.double().view(x.shape[0], -1, 32)
    dx = blocks.abs().amax(-1) / 127
    qx = torch.round(blocks / dx.clamp_min(1e-30)[..., None])
    return qx, dx.float().double()  # the kernel keeps dx in fp32


ROWS_OF_X = [1, 2, 3, 7, 16]  # one row's kernel, and batches of rows 2 or 4 at a time


def some_x(M: int, K: int) -> torch.Tensor:
    """M rows of x, the second's first block all zeros (a scale of 0)."""
    x = torch.randn(M, K)
    if M > 1:
        x[1, :32] = 0
    return x


@pytest.mark.parametrize("M", ROWS_OF_X)
@pytest.mark.parametrize("shape", [(37, 96), (64, 32), (8, 1536)])
def test_the_int4_kernel_is_its_formula(shape, M):
    torch.manual_seed(0)
    N, K = shape
    w, x = torch.randn(N, K), some_x(M, K)
    q, d, m = quantize_groups_int4(w)
    packed = native.pack_q4(q, d, m)
    assert packed.shape == (-(-N // 8), K // 32, native.Q4_BYTES)
    q2, d2, m2 = native.unpack_q4(packed, N)  # the layout's inverse
    assert torch.equal(q2, q.to(torch.uint8)) and torch.equal(d2, d.half())
    assert torch.equal(m2, m.half())
    # y = sum_b d dx (Q . qx) + m dx sum(qx), d and m in fp16
    qx, dx = quantized_x(x)
    qw = q.double().view(N, -1, 32)
    dots = torch.einsum("nbk,mbk->mnb", qw, qx)
    dw, mw = d.half().double(), m.half().double()
    expected = (dots * dw[None] * dx[:, None] + mw[None] * (dx * qx.sum(-1))[:, None]).sum(-1)
    got = torch.ops.monotile.q4_linear(x, packed, N)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", ROWS_OF_X)
@pytest.mark.parametrize("shape", [(37, 96), (16, 576)])
def test_the_int8_kernel_is_its_formula(shape, M):
    torch.manual_seed(0)
    N, K = shape
    w, x = torch.randn(N, K), some_x(M, K)
    q, s = quantize_rows(w)
    packed = native.pack_q8(q)
    assert torch.equal(native.unpack_q8(packed, N), q)
    idx = torch.tensor([[0, N - 1], [5, 5]])
    assert torch.equal(native.q8_rows(packed, idx), q[idx])
    # y = s sum_b dx (Q . qx)
    qx, dx = quantized_x(x)
    dots = torch.einsum("nbk,mbk->mnb", q.double().view(N, -1, 32), qx)
    expected = (dots * dx[:, None]).sum(-1) * s.double()
    scale = native._pad_rows(s).contiguous()
    got = torch.ops.monotile.q8_linear(x, packed, scale, N)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("M", ROWS_OF_X)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_float_kernel_is_a_plain_product(dtype, M):
    torch.manual_seed(0)
    w, x = torch.randn(45, 70), some_x(M, 70)
    packed = native.pack_float(w, dtype)
    idx = torch.tensor([3, 44, 0])
    assert torch.equal(native.float_rows(packed, idx), w.to(dtype)[idx])
    expected = x.double() @ w.to(dtype).double().t()  # x in fp32, sums in fp32
    got = torch.ops.monotile.float_linear(x, packed, 45)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, 64 * 96, 10**9])  # 8 rows a piece, 64, all at once
def test_layouts_made_a_few_rows_at_a_time_are_the_whole_matrix_laid_out(chunk):
    """quantize_pack_q4 and pack_float lay W out in pieces of whole 8-row groups, each given
    to `release` once laid out (the file's pages let go): the same bytes as all at once."""
    torch.manual_seed(0)
    w = torch.randn(141, 96)  # rows not a multiple of 8: the last group padded
    parts = []
    packed = native.quantize_pack_q4(w, parts.append, chunk)
    assert torch.equal(packed, native.pack_q4(*quantize_groups_int4(w)))
    assert torch.equal(torch.cat(parts), w)  # every row let go, once, in order
    assert len(parts) == (-(-141 // 8) if chunk == 1 else -(-141 // 64) if chunk < 10**6 else 1)
    for dtype in (torch.float32, torch.bfloat16):
        parts.clear()
        laid = native.pack_float(w, dtype, parts.append, chunk)
        whole = native.pack_float(w, dtype, None, 10**9)
        assert torch.equal(laid, whole) and torch.equal(torch.cat(parts), w)
        assert torch.equal(native.float_rows(laid, torch.arange(141)), w.to(dtype))


@pytest.mark.parametrize("kind", ["int4", "int8", "bfloat16"])
def test_a_native_layer_is_the_layer_it_replaces(kind):
    # a few rows through the kernel, a prompt's many through the dequantized W: both within
    # x's 8-bit rounding of the weights' own product
    torch.manual_seed(0)
    w, bias = torch.randn(40, 64) / 8, torch.randn(40)
    if kind == "int4":
        layer = native.NativeInt4Linear(w, bias)
        q, d, m = quantize_groups_int4(w)
        exact = (q.view(40, -1, 32) * d.half().float()[..., None]
                 + m.half().float()[..., None]).view(40, 64)
    elif kind == "int8":
        q, s = quantize_rows(w)
        layer = native.NativeInt8Linear(native.pack_q8(q), s, 40, bias)
        exact = q.float() * s[:, None]
    else:
        layer = native.NativeLinear(w, bias, torch.bfloat16)
        exact = w.bfloat16().float()
    assert torch.equal(layer.dequantized() if kind != "bfloat16" else layer.plain_weight().float(),
                       exact)
    for rows in (1, 3, GEMM_ROWS + 1):
        x = torch.randn(rows, 64)
        want = F.linear(x, exact, bias)
        tol = 2e-3 if kind == "bfloat16" and rows < GEMM_ROWS else 4e-2
        torch.testing.assert_close(layer(x), want, rtol=0, atol=tol * want.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_dim,length", [(64, 1), (64, 45), (40, 13)])
def test_the_attention_kernel_is_softmax_of_scaled_products(dtype, head_dim, length):
    # o = softmax(q k^T / sqrt(d)) v, one query a head, two query heads a K/V head, K and V
    # the first `length` positions of a longer cache (read in place): plain float64 math on
    # the same K and V. 64 takes the vector path (lengths of 8 and a tail), 40 the plain one
    torch.manual_seed(0)
    q = torch.randn(2, 6, 1, head_dim).to(dtype)  # a bf16 model's q, or an fp32 one's
    cache_k, cache_v = (torch.randn(2, 3, 50, head_dim).to(dtype) for _ in range(2))
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    kk, vv = (t.double().repeat_interleave(2, dim=1) for t in (k, v))
    scores = q.double() @ kk.transpose(-1, -2) / math.sqrt(head_dim)
    expected = torch.softmax(scores, -1) @ vv
    got = native.attend_one(q, k, v)
    assert got.dtype == torch.float32 and got.shape == q.shape
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)
    # and as PyTorch's fused kernel makes it, to its rounding
    fused = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    torch.testing.assert_close(got, fused, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int4"])
def test_a_native_models_decoding_steps_attend_in_the_kernel(dtype):
    # convert(native=True) gives each self-attention the kernel; a cached step's logits are
    # those of PyTorch's attention, and the prompt (many queries) stays with PyTorch's
    from monotile.core.attention import SelfAttention
    from monotile.core.transformer import ModelConfig
    from monotile.infer.convert import convert
    from monotile.modalities.text import LanguageModel
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, n_kv_head=1, d_model=128, context=32,
                      norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)
    model = LanguageModel(cfg).eval()  # heads of 64: the kernel's vector path
    convert(model, dtype, pack=False, native=True)
    layers = [m for m in model.modules() if isinstance(m, SelfAttention)]
    assert layers and all(m.one_query is native.attend_one for m in layers)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])

    def steps():
        cache = model.trunk.make_cache(1, 16)
        with torch.no_grad():
            out = [model(ids[:, :4], cache=cache, pos=0)[:, -1]]
            return torch.stack(out + [model(ids[:, t:t + 1], cache=cache, pos=t)[:, -1]
                                      for t in range(4, 10)], 1).float()
    with torch.profiler.profile() as prof:
        kernel = steps()
    calls = {e.key: e.count for e in prof.key_averages()}
    assert calls.get("monotile::attend_one") == 6 * len(layers), calls
    for m in layers:
        m.one_query = None
    # a bf16 cache (bf16's, int4's): PyTorch's takes q and gives its output in bf16, the
    # kernel keeps both in fp32
    tol = 1e-4 if dtype == "float32" else 2e-2
    torch.testing.assert_close(kernel, steps(), rtol=0, atol=tol * kernel.abs().max().item())


FUSED_SHAPES = {  # Llama's block (grouped heads, a biased qkv as Qwen's) and GPT-2's
    "llama": dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, qkv_bias=True,
                  n_kv_head=1),
    "gpt2": dict(norm="layernorm", mlp="gelu_tanh", positions="learned", bias=True),
    "gelu": dict(norm="layernorm", mlp="gelu", positions="rope", bias=False),
}


def fused_equals_operators(model, steps, calls: int, dtype: str) -> None:
    """steps() -> (logits, [(k, v) per layer]) run twice: through decode_block (`calls` calls
    of it), then with every block's fused step and the attention kernel taken away; the
    logits and the written caches agree (bf16 and the 8-bit rounding of x: the operators round
    between them, the call does not)."""
    from monotile.core.attention import SelfAttention
    with torch.profiler.profile() as prof:
        fused, fused_cache = steps()
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("monotile::decode_block") == calls, counts
    for b in model.trunk.blocks:
        b.one_token = None
    for m in model.modules():
        if isinstance(m, SelfAttention):
            m.one_query = None
    ops, ops_cache = steps()
    tol = 1e-4 if dtype == "float32" else 3e-2
    torch.testing.assert_close(fused, ops, rtol=0, atol=tol * ops.abs().max().item())
    for (k, v), (k_ops, v_ops) in zip(fused_cache, ops_cache):
        torch.testing.assert_close(k, k_ops, rtol=0, atol=tol * k_ops.abs().max().item())
        torch.testing.assert_close(v, v_ops, rtol=0, atol=tol * v_ops.abs().max().item())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8", "int4"])
@pytest.mark.parametrize("shape", list(FUSED_SHAPES))
def test_a_fused_block_step_is_the_blocks_operators(dtype, shape):
    # convert(fused_steps=True): a block's one-token step is one decode_block call, whose
    # logits and written cache are those of the block's operators with PyTorch's attention
    # (bf16 and the 8-bit rounding of x: the operators round between them, the call does not)
    from monotile.core.transformer import ModelConfig
    from monotile.infer.convert import convert
    from monotile.modalities.text import LanguageModel
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=128, context=32,
                      **FUSED_SHAPES[shape])
    model = LanguageModel(cfg).eval()
    convert(model, dtype, pack=False, native=True, fused_steps=True)
    blocks = list(model.trunk.blocks)
    assert all(b.one_token is not None for b in blocks)
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8]])

    def steps():  # two rows, a 4-token prompt (the operators), then 6 steps
        cache = model.trunk.make_cache(2, 16)
        with torch.no_grad():
            out = [model(ids[:, :4], cache=cache, pos=0)[:, -1]]
            out += [model(ids[:, t:t + 1], cache=cache, pos=t)[:, -1] for t in range(4, 10)]
        return torch.stack(out, 1).float(), [(c.k[:, :, :10].float(), c.v[:, :, :10].float())
                                             for c in cache]
    fused_equals_operators(model, steps, 6 * len(blocks), dtype)


@pytest.mark.parametrize("dtype", ["float32", "int4"])
@pytest.mark.parametrize("shape", ["llama", "gpt2"])
def test_a_fused_step_takes_each_row_at_its_own_position(dtype, shape):
    # a server's rows: prompts of 3, 6 and 4 tokens prefilled one by one into their rows, then
    # steps at a position a row (Transformer._forward_rows): decode_block reads each row's keys
    # 0..pos[b] as the operators' key mask does, and writes each at its own position
    from monotile.core.transformer import ModelConfig
    from monotile.infer.convert import convert
    from monotile.modalities.text import LanguageModel
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=128, context=32,
                      **FUSED_SHAPES[shape])
    model = LanguageModel(cfg).eval()
    convert(model, dtype, pack=False, native=True, fused_steps=True)
    ids = torch.randint(50, (3, 12), generator=torch.Generator().manual_seed(1))
    lengths = torch.tensor([3, 6, 4])

    def steps():
        cache = model.trunk.make_cache(3, 16)
        out = []
        with torch.no_grad():
            for b, n in enumerate(lengths.tolist()):
                model(ids[b:b + 1, :n], cache=[c.rows(b, b + 1) for c in cache], pos=0)
            for t in range(5):
                pos = lengths + t
                out.append(model(ids.gather(1, pos[:, None]), cache=cache, pos=pos)[:, -1])
        return torch.stack(out, 1).float(), [(c.k.float(), c.v.float()) for c in cache]
    fused_equals_operators(model, steps, 5 * cfg.n_layer, dtype)


def test_a_block_the_fused_step_does_not_run_keeps_its_operators():
    # post-norm, a LoRA adapter, plain float layers: block_step gives None, and Block.forward
    # runs its operators
    from monotile.core.lora import add_lora
    from monotile.core.transformer import ModelConfig
    from monotile.modalities.text import LanguageModel
    cfg = ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=64, context=16)
    plain = LanguageModel(cfg).eval()
    assert native.block_step(plain.trunk.blocks[0]) is None
    post = LanguageModel(cfg.replace(norm_position="post")).eval()
    adapted = LanguageModel(cfg).eval()
    add_lora(adapted, 4, 8.0, ["qkv"])
    from monotile.infer.convert import convert
    for model in (post, adapted):
        convert(model, "int8", pack=False, native=True, fused_steps=True)
        assert model.trunk.blocks[0].one_token is None


@pytest.mark.parametrize("dtype", ["float32", "int8", "int4"])
def test_a_models_native_weights_lie_in_one_block_in_step_order(dtype, monkeypatch):
    # convert(native=True) lays every packed weight out in one WeightBlock, one after another
    # as the layers come; the model computes exactly what it computes with them apart
    from monotile.core.transformer import ModelConfig
    from monotile.infer.convert import convert
    from monotile.modalities.text import LanguageModel
    cfg = ModelConfig(vocab_size=64, n_layer=2, n_head=2, d_model=64, context=16,
                      norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    apart = LanguageModel(cfg).eval()
    apart.load_state_dict(model.state_dict())
    convert(model, dtype, pack=False, native=True, fused_steps=True)
    monkeypatch.setattr(native.WeightBlock, "available", classmethod(lambda cls: False))
    convert(apart, dtype, pack=False, native=True, fused_steps=True)
    layers = [m for m in model.modules() if isinstance(m, native._NativeLayer)]
    assert len(layers) == 2 * 4 + 1  # qkv, wo, gate_up, down a block, and the head
    spans = sorted((m.packed.data_ptr(), m.packed.data_ptr() + m.packed.nbytes)
                   for m in layers)
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))  # no overlap
    assert spans[-1][1] - spans[0][0] < sum(end - start for start, end in spans) + 64 * 9
    ids = torch.tensor([[5, 3, 9, 1]])
    with torch.no_grad():
        assert torch.equal(model(ids), apart(ids))
        block_step, apart_step = (m.trunk.make_cache(1, 8) for m in (model, apart))
        assert torch.equal(model(ids[:, :1], cache=block_step, pos=0),
                           apart(ids[:, :1], cache=apart_step, pos=0))


def test_a_weight_block_reserves_room_not_memory():
    # a terabyte reserved (MAP_NORESERVE): only the bytes written become resident, so a bound
    # far above a large model's layouts costs nothing on a small machine
    if Path("/proc/sys/vm/overcommit_memory").read_text().strip() == "2":
        pytest.skip("strict overcommit: convert falls back to tensors of their own")
    block = native.WeightBlock(1 << 40)
    with block.filling():
        packed = native.pack_float(torch.ones(8, 32), torch.float32)
    assert block.holds(packed) and packed.sum().item() == 256


def test_a_full_weight_block_leaves_a_layout_in_a_tensor_of_its_own():
    w = torch.randn(8, 16)
    block = native.WeightBlock(1000)
    with block.filling():
        first = native.pack_float(w, torch.float32)  # 512 bytes: fits
        second = native.pack_float(w, torch.float32)  # to 1024 of 1000: does not
    outside = native.pack_float(w, torch.float32)
    assert block.holds(first) and not block.holds(second) and not block.holds(outside)
    assert torch.equal(first, outside) and torch.equal(second, outside)


def test_a_missing_compiler_is_a_reason_not_a_crash(tmp_path):
    # a fresh cache and no compiler: available() is False and says why; nothing half-built
    code = ("from monotile.infer import native; print(native.available()); "
            "print(native.reason())")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "XDG_CACHE_HOME": str(tmp_path),
                               "CXX": "no-such-compiler", "HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False", "no C++ compiler (no-such-compiler)"]
    assert not list(tmp_path.rglob("*.so"))


def test_a_kernel_given_the_wrong_shapes_refuses_them():
    # a one-line error, not a read past the end of a buffer
    q, d, m = quantize_groups_int4(torch.randn(16, 96))
    packed = native.pack_q4(q, d, m)
    with pytest.raises(RuntimeError, match="q4_linear: shapes do not match"):
        torch.ops.monotile.q4_linear(torch.randn(1, 64), packed, 16)
    with pytest.raises(RuntimeError, match="q8_linear"):
        torch.ops.monotile.q8_linear(torch.randn(1, 96), packed, torch.ones(16), 16)
    with pytest.raises(RuntimeError, match="float_linear"):
        torch.ops.monotile.float_linear(torch.randn(1, 96), torch.randn(2, 95, 8), 16)
    k = torch.randn(1, 2, 5, 64)
    with pytest.raises(RuntimeError, match="attend_one: q"):  # two queries a head
        native.attend_one(torch.randn(1, 4, 2, 64), k, k)
    with pytest.raises(RuntimeError, match="attend_one: q"):  # 3 heads on 2 K/V heads
        native.attend_one(torch.randn(1, 3, 1, 64), k, k)
    with pytest.raises(RuntimeError, match="attend_one: CPU k and v"):  # d not contiguous
        native.attend_one(torch.randn(1, 4, 1, 64), k.transpose(2, 3).contiguous().mT, k)
    w = [torch.empty(0)] * 16
    with pytest.raises(RuntimeError, match="decode_block: x"):  # two tokens
        torch.ops.monotile.decode_block(torch.randn(1, 2, 128), w, k, k, torch.empty(0), [0],
                                        [256, 128, 256, 128], 2, 2, False, 0, 1e-5)
    with pytest.raises(RuntimeError, match="decode_block: k and v"):  # past the cache
        torch.ops.monotile.decode_block(torch.randn(1, 1, 128), w, k, k, torch.empty(0), [5],
                                        [384, 128, 256, 128], 2, 2, False, 0, 1e-5)
    with pytest.raises(RuntimeError, match="decode_block: one position"):  # 2 for 1 row
        torch.ops.monotile.decode_block(torch.randn(1, 1, 128), w, k, k, torch.empty(0), [1, 2],
                                        [384, 128, 256, 128], 2, 2, False, 0, 1e-5)


def test_which_fp32_shapes_multiply_here_is_measured_once_and_kept(tmp_path, monkeypatch):
    # each shape timed in a pass like a model's (here and in the way the compiled step would
    # multiply it otherwise); the verdicts kept per machine and shape, then read, not measured
    from monotile.infer import packed
    verdicts_file = tmp_path / "layouts.json"
    monkeypatch.setattr(packed, "_verdicts_file", lambda: verdicts_file)
    shapes = {(64, 96): 3, (96, 64): 3, (64, 1000): 1}
    for compiler_packs, other in ((False, "plain"), (True, "mkl" if torch._C.has_mkl else "plain")):
        chosen = native.float32_native_shapes(shapes, compiler_packs)
        assert chosen <= set(shapes)
        (machine, verdicts), = json.loads(verdicts_file.read_text()).items()
        keys = {s: native.float32_key(s, c, other) for s, c in shapes.items()}
        assert {verdicts[k] for k in keys.values()} <= {0, 1}
        assert chosen == {s for s, k in keys.items() if verdicts[k]}
    doc = json.loads(verdicts_file.read_text())
    for key in doc[machine]:
        doc[machine][key] = int("96->64" in key)
    verdicts_file.write_text(json.dumps(doc))
    assert native.float32_native_shapes(shapes, True) == {(96, 64)}
    assert native.float32_native_shapes(shapes, False) == {(96, 64)}


def test_every_way_an_fp32_shape_is_timed_makes_the_same_product():
    # the ways float32_native_shapes weighs (FLOAT32_WAYS, the functions it times) multiply
    # alike: the timing would be wrong if one of them multiplied something else
    torch.manual_seed(0)
    w, x = torch.randn(40, 64), torch.randn(1, 64)
    want = x @ w.t()
    names = [n for n in native.FLOAT32_WAYS if n != "mkl" or torch._C.has_mkl]
    assert len(names) >= 2
    for name in names:
        torch.testing.assert_close(native.FLOAT32_WAYS[name](w)(x), want, rtol=1e-5, atol=1e-5)
    times = native.time_float32_ways({(64, 40): 3, (40, 64): 1}, tuple(names))
    assert set(times) == set(names)
    assert all(t.keys() == {(64, 40), (40, 64)} and min(t.values()) > 0 for t in times.values())
