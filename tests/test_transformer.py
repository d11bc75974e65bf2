"""The trunk: configuration checks, init, parameter and FLOP counts against references."""

import pytest
import torch
import torch.nn.functional as F

from monotile.core.transformer import (ModelConfig, count_parameters, flops_per_token,
                                       init_weights)
from monotile.errors import ConfigError
from monotile.modalities.text import LanguageModel


@pytest.mark.parametrize("bad, message", [
    (dict(n_head=3), "n_head=3 is invalid: it must divide d_model=128"),
    (dict(context=0), "context=0 is invalid"),
    (dict(n_kv_head=3), "n_kv_head=3 is invalid"),
    (dict(norm="batchnorm"), "norm='batchnorm' is invalid"),
    (dict(dropout=1.5), "dropout=1.5 is invalid"),
])
def test_invalid_model_settings_are_refused_by_name(bad, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig(**{"d_model": 128, "n_head": 4, **bad})


def test_parameter_count_equals_hugging_face_gpt2_with_the_same_dimensions():
    from transformers import GPT2Config, GPT2LMHeadModel
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=65, n_positions=64, n_embd=128, n_layer=4,
                                     n_head=4))
    ours = LanguageModel(ModelConfig(vocab_size=65, n_layer=4, n_head=4, d_model=128,
                                     context=64, bias=True, mlp="gelu_tanh"))
    assert count_parameters(ours) == ref.num_parameters()


def test_llama_style_block_has_no_biases_and_fewer_kv_weights():
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=64,
                      norm="rmsnorm", mlp="swiglu", positions="rope", bias=False)
    model = LanguageModel(cfg)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("bias") for n in names)
    assert model.trunk.blocks[0].attn.qkv.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert model.trunk.pos_emb is None


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=100, n_layer=8, n_head=4, d_model=256, context=64)
    model = LanguageModel(cfg)
    init_weights(model, cfg.n_layer)
    block = model.trunk.blocks[0]
    assert block.attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.attn.wo.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.mlp.fc2.weight.std().item() == pytest.approx(0.02 / 4, rel=0.05)
    assert block.norm1.weight.eq(1).all() and block.attn.qkv.bias.eq(0).all()


@pytest.mark.parametrize("style", [dict(), dict(norm="rmsnorm", mlp="swiglu",
                                                positions="rope", n_kv_head=2, bias=False)])
def test_flops_per_token_matches_torch_flop_counter(style):
    from torch.utils.flop_counter import FlopCounterMode
    cfg = ModelConfig(vocab_size=512, n_layer=3, n_head=4, d_model=128, context=64, **style)
    model = LanguageModel(cfg)
    model.trunk.set_attention_impl("math")  # the flop counter sees the matmuls one by one
    x = torch.randint(512, (2, 64))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x).view(-1, 512), x.view(-1)).backward()
    counted = counter.get_total_flops() / x.numel()
    assert flops_per_token(cfg) == pytest.approx(counted, rel=0.05)


@pytest.mark.parametrize("positions", ["learned", "rope"])
def test_rows_at_their_own_positions_decode_as_each_row_alone(positions):
    """A server's batch: rows of different lengths, one token each at its own position, give
    the logits each sequence gives alone (and a finished row's place can be taken over)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_kv_head=2, d_model=32, context=32,
                      positions=positions)
    model = LanguageModel(cfg).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (5, 12, 3)]
    cache = model.trunk.make_cache(4)
    with torch.no_grad():
        for b, s in enumerate(seqs):  # prefill each alone into its own row
            model(s[None, :-1], cache=[c.rows(b, b + 1) for c in cache], pos=0)
        for c in cache:  # the row 0 request ends: the last one moves into its place
            c.move_row(2, 0)
        seqs = [seqs[2], seqs[1]]
        last = torch.stack([s[-1] for s in seqs])[:, None]
        pos = torch.tensor([len(s) - 1 for s in seqs])
        batched = model(last, cache=[c.rows(0, 2) for c in cache], pos=pos)[:, 0]
        for b, s in enumerate(seqs):
            torch.testing.assert_close(batched[b], model(s[None])[0, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="past the context"):
        model(last, cache=cache, pos=torch.tensor([32, 3]))
