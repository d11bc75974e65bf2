"""Attention: the fused path equals the written-out formula; masks, RoPE, GQA and the cache."""

import math

import pytest
import torch

from monotile.core.attention import (SelfAttention, apply_rope, apply_rope_real, attention,
                                     attention_math, causal_mask, qkv_rotations,
                                     rope_frequencies)
from monotile.core.transformer import ModelConfig, Transformer


def qkv(B=2, H=4, Hkv=4, Tq=6, Tk=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, d, generator=g), torch.randn(B, Hkv, Tk, d, generator=g),
            torch.randn(B, Hkv, Tk, d, generator=g))


def test_attention_math_is_softmax_of_scaled_scores_times_values():
    q, k, v = qkv(B=1, H=1, Hkv=1)
    s = q[0, 0] @ k[0, 0].T / math.sqrt(8)
    expected = torch.softmax(s, -1) @ v[0, 0]
    torch.testing.assert_close(attention_math(q, k, v)[0, 0], expected)


@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_path_equals_math_path(causal):
    q, k, v = qkv()
    fused = attention(q, k, v, is_causal=causal, impl="sdpa")
    plain = attention(q, k, v, is_causal=causal, impl="math")
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-5)


def test_sdpa_path_equals_math_path_with_padding_and_cache_offsets():
    q, k, v = qkv(Tq=3, Tk=7)  # 3 new queries over 7 keys, 4 of them from a cache
    padding = torch.tensor([[True] * 7, [False, False] + [True] * 5])[:, None, None, :]
    for mask in (None, padding):
        torch.testing.assert_close(attention(q, k, v, mask=mask, is_causal=True, impl="sdpa"),
                                   attention(q, k, v, mask=mask, is_causal=True, impl="math"),
                                   atol=1e-5, rtol=1e-5)
    ref = attention_math(q, k, v, causal_mask(3, 7) & padding)
    torch.testing.assert_close(attention(q, k, v, mask=padding, is_causal=True), ref,
                               atol=1e-5, rtol=1e-5)


def test_bf16_attention_on_cpu_runs_in_fp32_under_autocast_and_without():
    q, k, v = (t.bfloat16() for t in qkv())
    q.requires_grad_()
    expected = attention_math(q.float(), k.float(), v.float(), causal_mask(6, 6)).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = attention(q, k, v, is_causal=True)
        from_fp32 = attention(q.float(), k.float(), v.float(), is_causal=True)
    plain = attention(q, k, v, is_causal=True)
    assert under_autocast.dtype == plain.dtype == torch.bfloat16
    assert from_fp32.dtype == torch.float32  # autocast did not turn the fp32 inputs to bf16
    for out in (under_autocast, plain):  # equal up to a rounding of the last bf16 bit
        torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(from_fp32.bfloat16(), expected, atol=1e-2, rtol=1e-2)
    under_autocast.float().sum().backward()
    assert q.grad.dtype == torch.bfloat16 and q.grad.isfinite().all()


def test_inference_reads_bf16_keys_and_values_as_they_are(monkeypatch):
    # without gradients or autocast, bf16 K and V (a bf16 model's, or a 16-bit cache under an
    # fp32 model) go to the kernel in bf16, which sums in fp32: the formula on the same rounded
    # values, an fp32 query cast to bf16 first and the result cast back to fp32. Training (and
    # its evaluation under autocast) and the written-out formula attend in fp32 as before
    q, k, v = qkv(H=4, Hkv=2, Tq=1, Tk=9)
    k16, v16 = k.bfloat16(), v.bfloat16()
    expected = attention_math(q, k16.float().repeat_interleave(2, 1),
                              v16.float().repeat_interleave(2, 1))
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: seen.append(k.dtype) or sdpa(q, k, v, **kw))
    with torch.no_grad():
        mixed = attention(q, k16, v16)
        both = attention(q.bfloat16(), k16, v16)
        assert seen == [torch.bfloat16] * 2
        with torch.autocast("cpu", dtype=torch.bfloat16):
            attention(q.bfloat16(), k16, v16)
        assert seen[-1] == torch.float32
        assert attention(q.bfloat16(), k16, v16, impl="math").dtype == torch.bfloat16
    attention(q.bfloat16().requires_grad_(), k16, v16)
    assert seen[-1] == torch.float32
    assert mixed.dtype == torch.float32 and both.dtype == torch.bfloat16
    for out in (mixed, both):
        torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


def test_a_query_that_sees_no_key_gets_zero_on_both_paths():
    q, k, v = qkv(B=1, Tq=4, Tk=4)
    padding = torch.tensor([[False, False, True, True]])[:, None, None, :]  # left padding
    for impl in ("sdpa", "math"):
        out = attention(q, k, v, mask=padding, is_causal=True, impl=impl)
        assert out[:, :, :2].eq(0).all() and out.isfinite().all(), impl


def test_causal_mask_lets_query_see_only_itself_and_the_past():
    m = causal_mask(3, 5)  # queries at positions 2, 3, 4 of 5 keys
    assert m.tolist() == [[True, True, True, False, False],
                          [True, True, True, True, False],
                          [True, True, True, True, True]]


def test_padding_mask_hides_padded_keys():
    q, k, v = qkv(B=1, H=1, Hkv=1, Tq=4, Tk=4)
    padding = torch.tensor([[True, True, True, False]])[:, None, None, :]
    out = attention(q, k, v, mask=padding)
    ref = attention(q, k[:, :, :3], v[:, :, :3])  # as if the padded key never existed
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_grouped_query_attention_equals_multi_head_with_repeated_kv():
    q, k, v = qkv(H=4, Hkv=2)
    out = attention(q, k, v, is_causal=True)
    mha = attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(out, mha)


def test_self_attention_equals_torch_multihead_attention():
    torch.manual_seed(0)
    ours = SelfAttention(16, n_head=4, n_kv_head=4, bias=True)
    ref = torch.nn.MultiheadAttention(16, 4, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(ours.qkv.weight)
        ref.in_proj_bias.copy_(ours.qkv.bias)
        ref.out_proj.weight.copy_(ours.wo.weight)
        ref.out_proj.bias.copy_(ours.wo.bias)
    x = torch.randn(2, 5, 16)
    expected, _ = ref(x, x, x, attn_mask=~causal_mask(5, 5), need_weights=False)
    torch.testing.assert_close(ours(x, causal=True), expected, atol=1e-5, rtol=1e-5)


def test_rope_equals_hugging_face_llama_rotary_embedding_up_to_the_pair_layout():
    """HF pairs x_j with x_{j+d/2}; we pair x_2j with x_2j+1. Interleaving the halves maps
    one layout onto the other, so rotating there and back must equal HF's rotation."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import (LlamaRotaryEmbedding,
                                                          apply_rotary_pos_emb)
    q, k, _ = qkv(Tq=10, Tk=10, d=16)
    config = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=500.0)
    cos, sin = LlamaRotaryEmbedding(config)(q, torch.arange(10)[None])
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)

    def interleave(x):    # [a_0..a_7, b_0..b_7] -> [a_0, b_0, a_1, b_1, ...]
        return x.unflatten(-1, (2, 8)).transpose(-1, -2).flatten(-2)

    def deinterleave(x):
        return x.unflatten(-1, (8, 2)).transpose(-1, -2).flatten(-2)
    freqs = rope_frequencies(16, 10, theta=500.0)
    torch.testing.assert_close(deinterleave(apply_rope(interleave(q), freqs)), ref_q)
    torch.testing.assert_close(deinterleave(apply_rope(interleave(k), freqs)), ref_k)


def test_rope_table_is_the_rounded_cos_and_sin_of_its_fp32_angles_in_every_process():
    # a fresh process's first table (PyTorch's first cos of a process was off by up to 1.5e-4
    # in half its entries, one start in two): Python's math.cos and math.sin of the same fp32
    # angles p theta_j, rounded to fp32, entry for entry
    import subprocess
    import sys
    script = ("import math, torch\n"
              "from monotile.core.attention import rope_frequencies\n"
              "t = rope_frequencies(16, 1024, 10000.0)\n"
              "inv = 1.0 / 10000.0 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16)\n"
              "a = torch.outer(torch.arange(1024, dtype=torch.float32), inv).double()\n"
              "ref = torch.tensor([[[math.cos(x), math.sin(x)] for x in row]\n"
              "                    for row in a.tolist()], dtype=torch.float64).float()\n"
              "print(int((t != ref).sum()), float((t - ref).abs().max()))\n")
    for _ in range(3):  # the old fault showed in one start of two
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             check=True).stdout.split()
        assert out == ["0", "0.0"], out


def test_rope_is_a_rotation_of_each_pair():
    x = torch.tensor([[1.0, 0.0, 0.0, 2.0]])  # one position (p = 3), d = 4
    freqs = rope_frequencies(4, 4, theta=100.0)[3:4]
    angle0, angle1 = 3 * 1.0, 3 * 100.0 ** (-2 / 4)
    expected = [math.cos(angle0), math.sin(angle0),
                -2 * math.sin(angle1), 2 * math.cos(angle1)]
    torch.testing.assert_close(apply_rope(x, freqs)[0], torch.tensor(expected))


def test_rope_in_real_arithmetic_equals_the_complex_multiply():
    qkv = torch.randn(2, 10, 8, 16)
    rot = qkv_rotations(rope_frequencies(16, 10), 6, 2)
    torch.testing.assert_close(apply_rope_real(qkv, rot), apply_rope(qkv, rot))


def test_one_pass_over_fused_qkv_rotates_q_and_k_and_leaves_v_alone():
    qkv = torch.randn(2, 10, 4 + 2 * 2, 16)  # (B, T, H + 2 Hkv, d) with H = 4, Hkv = 2
    freqs = rope_frequencies(16, 10)
    out = apply_rope(qkv, qkv_rotations(freqs, 4 + 2, 2))
    torch.testing.assert_close(out[:, :, :6], apply_rope(qkv[:, :, :6], freqs[:, None]))
    torch.testing.assert_close(out[:, :, 6:], qkv[:, :, 6:])


def test_rope_scores_depend_only_on_relative_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 16, generator=g), torch.randn(1, 16, generator=g)
    freqs = rope_frequencies(16, 64)

    def score(m, n):
        return (apply_rope(q, freqs[m:m + 1]) * apply_rope(k, freqs[n:n + 1])).sum().item()
    assert score(5, 2) == pytest.approx(score(40, 37), abs=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), abs=1e-3)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_causal_logits_at_t_do_not_change_when_later_tokens_change(style):
    from monotile.modalities.text import LanguageModel
    cfg = ModelConfig(vocab_size=40, n_layer=2, n_head=4, d_model=32, context=16,
                      **STYLES[style])
    torch.manual_seed(0)
    model = LanguageModel(cfg).eval()
    x = torch.randint(40, (1, 16))
    y = x.clone()
    y[:, 9:] = (x[:, 9:] + 1 + torch.randint(38, (1, 7))) % 40  # every token after 8 differs
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :9], b[:, :9])
    assert not torch.allclose(a[:, 9:], b[:, 9:])


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_kv_cache_step_by_step_equals_one_full_forward(style):
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, context=16, **STYLES[style])
    torch.manual_seed(0)
    trunk = Transformer(cfg).eval()
    x = torch.randn(2, 12, 32)
    full = trunk(x)
    cache = trunk.make_cache(2)
    parts = [trunk(x[:, :5], cache=cache, pos=0)]
    parts += [trunk(x[:, t:t + 1], cache=cache, pos=t) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_a_trunk_configured_with_math_attention_equals_the_fused_one(style):
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, context=16, **STYLES[style])
    torch.manual_seed(0)
    fused = Transformer(cfg).eval()
    plain = Transformer(cfg.replace(attention="math")).eval()
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 12, 32)
    padding = torch.tensor([[True] * 12, [False] * 3 + [True] * 9])
    for causal in (True, False):
        torch.testing.assert_close(plain(x, causal=causal, key_padding=padding),
                                   fused(x, causal=causal, key_padding=padding),
                                   atol=1e-5, rtol=1e-5)


STYLES = {
    "gpt2": dict(norm="layernorm", mlp="gelu", positions="learned", bias=True),
    "llama": dict(norm="rmsnorm", mlp="swiglu", positions="rope", bias=False, n_kv_head=2),
}
