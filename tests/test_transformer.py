"""The trunk: configuration checks, init, parameter and FLOP counts against references, and
the rope table's dtype and place."""

import copy
import dataclasses

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

import monotile
from monotile.core.transformer import (ModelConfig, Transformer, count_parameters,
                                       flops_per_token, init_weights)
from monotile.errors import ConfigError
from monotile.modalities.text import LanguageModel


@pytest.mark.parametrize("bad, message", [
    (dict(n_head=3), "n_head=3 is invalid: it must divide d_model=128"),
    (dict(context=0), "context=0 is invalid"),
    (dict(n_kv_head=3), "n_kv_head=3 is invalid"),
    (dict(norm="batchnorm"), "norm='batchnorm' is invalid"),
    (dict(dropout=1.5), "dropout=1.5 is invalid"),
    (dict(attention="flash"), "attention='flash' is invalid: choose sdpa or math"),
    (dict(n_layer=4, activation_checkpointing=5), "activation_checkpointing=5 is invalid"),
    (dict(activation_checkpointing=-1), "activation_checkpointing=-1 is invalid"),
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
    model = LanguageModel(cfg.replace(attention="math"))  # the counter sees each matmul
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
        for c in cache:  # the row 0 request ends: the last one moves into its place, the
            c.move_row(2, 0, len(seqs[2]) - 1)  # positions it holds (row 0's stale ones masked)
        seqs = [seqs[2], seqs[1]]
        last = torch.stack([s[-1] for s in seqs])[:, None]
        pos = torch.tensor([len(s) - 1 for s in seqs])
        batched = model(last, cache=[c.rows(0, 2) for c in cache], pos=pos)[:, 0]
        for b, s in enumerate(seqs):
            torch.testing.assert_close(batched[b], model(s[None])[0, -1], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="past the context"):
        model(last, cache=cache, pos=torch.tensor([32, 3]))


@pytest.mark.parametrize("norm_position", ["pre", "post"])
def test_a_padded_batch_gives_each_sequence_what_it_gives_alone(norm_position):
    """At inference the MLPs skip padded rows (Block's `rows`): every real token's features
    are those of its sequence run alone, and those of the same batch in training mode
    (every row through every layer, dropout 0); a padded row's stay finite."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=3, n_head=4, d_model=32, context=16,
                      norm_position=norm_position, mlp="gelu", norm="layernorm")
    trunk = Transformer(cfg)
    lengths = (7, 16, 3)
    x, real = torch.randn(3, 16, 32), torch.zeros(3, 16, dtype=torch.bool)
    for b, n in enumerate(lengths):
        real[b, :n] = True
    with torch.no_grad():
        every_row = trunk.train()(x, causal=False, key_padding=real)
        skipped = trunk.eval()(x, causal=False, key_padding=real)
        for b, n in enumerate(lengths):
            alone = trunk(x[b:b + 1, :n], causal=False)[0]
            torch.testing.assert_close(skipped[b, :n], alone, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(skipped[b, :n], every_row[b, :n], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(skipped).all()


def test_a_config_written_before_the_attention_field_loads_with_the_fused_attention():
    old = {f.name: getattr(ModelConfig(), f.name) for f in dataclasses.fields(ModelConfig)
           if f.name != "attention"}  # a run's config.json from before the field existed
    cfg = ModelConfig(**old)
    assert cfg.attention == "sdpa"
    assert {b.attn.impl for b in Transformer(cfg).blocks} == {"sdpa"}
    math = Transformer(cfg.replace(attention="math", cross_attention=True))
    assert {m.impl for b in math.blocks for m in (b.attn, b.cross_attn)} == {"math"}


def test_the_rope_table_stays_fp32_through_casts_and_is_not_saved():
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=32, context=16,
                      positions="rope", norm="rmsnorm", mlp="swiglu", bias=False)
    fresh = Transformer(cfg).rope
    assert fresh.dtype == torch.float32 and fresh.shape == (16, 4, 2)
    for name, cast in [("bfloat16", lambda m: m.to(torch.bfloat16)), ("half", lambda m: m.half()),
                       ("deepcopy", lambda m: copy.deepcopy(m.to(torch.bfloat16))),
                       ("meta", lambda m: m.to("meta").to_empty(device="cpu"))]:
        trunk = cast(Transformer(cfg))
        assert trunk.rope.dtype == torch.float32, name
        torch.testing.assert_close(trunk.rope, fresh, atol=0, rtol=0, msg=name)
        assert "rope" in dict(trunk.named_buffers()), name  # so .to(device) moves it
        assert not any("rope" in key for key in trunk.state_dict()), name
    with torch.device("meta"):  # a size that does not fit here: nothing is computed
        assert Transformer(cfg).rope.device.type == "meta"
    trunk = Transformer(cfg).to(torch.bfloat16)
    out = trunk(torch.randn(2, 16, 32, dtype=torch.bfloat16))
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


def test_a_model_built_to_be_loaded_skips_the_random_draws_and_init_comes_back_after():
    from monotile.core.transformer import weights_left_uninitialised
    state = torch.random.get_rng_state()
    with weights_left_uninitialised():
        layer = nn.Linear(64, 64)
        nn.init.normal_(layer.weight)
    assert torch.equal(torch.random.get_rng_state(), state)  # nothing was drawn
    with pytest.raises(RuntimeError), weights_left_uninitialised():
        raise RuntimeError("a failed build")
    torch.manual_seed(0)
    drawn = nn.Linear(64, 64).weight
    assert not torch.equal(torch.random.get_rng_state(), state)
    torch.manual_seed(0)
    assert torch.equal(nn.Linear(64, 64).weight, drawn)  # the draws are back, seeded as before


def test_a_loaded_run_has_the_weights_it_saved(tiny_run):
    saved = load_file(tiny_run.dir / "model.safetensors")
    loaded = monotile.load(tiny_run.dir).model.state_dict()
    assert saved and all(torch.equal(loaded[name], t) for name, t in saved.items())


def kept_for_backward(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the tensors a training forward pass makes that are still alive when it ends:
    what autograd keeps for backward (and the output), each storage once, weights aside.
    Measured, not counted from the model: a TorchDispatchMode sees every tensor made, and a
    weak reference to its storage tells whether anything still holds it."""
    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves
    made = []

    class Made(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    made.append((StorageWeakRef(s), s.data_ptr(), s.nbytes()))
            return out

    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    with Made():
        out = model.train()(x)
    alive = {ptr: n for ref, ptr, n in made if not ref.expired() and ptr not in weights}
    del out
    return sum(alive.values())


@pytest.mark.parametrize("every", [1, 2])
def test_activation_checkpointing_gives_the_gradients_of_plain_backward(every):
    """Every `every`-th block recomputed in backward: the same loss and gradients (dropout
    and stochastic depth draw the same masks again: the recompute restores the RNG)."""
    cfg = ModelConfig(vocab_size=64, n_layer=4, n_head=4, d_model=64, context=32, dropout=0.1,
                      drop_path=0.1)
    x = torch.randint(64, (4, 32), generator=torch.Generator().manual_seed(0))
    losses, grads = [], []
    for k in (0, every):
        torch.manual_seed(0)
        model = LanguageModel(cfg.replace(activation_checkpointing=k))
        init_weights(model, cfg.n_layer)
        torch.manual_seed(1)
        loss = F.cross_entropy(model.train()(x).flatten(0, 1), x.flatten())
        loss.backward()
        losses.append(loss.detach())
        grads.append({n: p.grad for n, p in model.named_parameters()})
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-6, atol=1e-7, msg=name)


def test_activation_checkpointing_keeps_only_each_blocks_input_for_backward():
    """Two more blocks keep 2 B T d values when recomputed (their input), and about
    2 B T (8 d + 2 h) when not: the activations memory_per_process counts per block."""
    B, T, d = 4, 32, 64
    cfg = ModelConfig(vocab_size=64, n_head=4, d_model=d, context=T)
    x = torch.randint(64, (B, T), generator=torch.Generator().manual_seed(0))
    per_block = {}
    for k in (0, 1):
        kept = [kept_for_backward(LanguageModel(cfg.replace(n_layer=L,
                                                            activation_checkpointing=k)), x)
                for L in (2, 4)]
        per_block[k] = (kept[1] - kept[0]) / 2
    assert per_block[1] == 4 * B * T * d  # fp32: its input, nothing else
    assert per_block[0] == pytest.approx(4 * B * T * (8 * d + 2 * cfg.hidden), rel=0.25)


def test_a_checkpointing_model_decodes_with_its_kv_cache_as_a_plain_one():
    """Checkpointing is for training with gradients: evaluation, no_grad and the KV cache
    paths give what the same weights give without it."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=2, d_model=32, context=16,
                      positions="rope")
    plain = LanguageModel(cfg)
    recomputing = LanguageModel(cfg.replace(activation_checkpointing=1))
    recomputing.load_state_dict(plain.state_dict())
    x = torch.randint(50, (2, 10))
    for model in (plain, recomputing):
        model.train()  # dropout 0: train mode computes what eval does
    with torch.no_grad():
        full = plain(x)
        torch.testing.assert_close(recomputing(x), full, rtol=0, atol=0)
        cache = recomputing.trunk.make_cache(2)
        steps = [recomputing(x[:, :6], cache=cache)] + [
            recomputing(x[:, i:i + 1], cache=cache, pos=i) for i in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def resident_mib() -> float:
    return int(next(line for line in open("/proc/self/status")
                    if line.startswith("VmRSS")).split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads Linux's /proc")
def test_a_large_cpu_cache_takes_memory_as_its_positions_are_written():
    from monotile.core.attention import KVCache
    before = resident_mib()
    cache = KVCache(16, 4, 8192, 64, torch.float32, "cpu")  # 2 x 128 MiB
    assert torch.count_nonzero(cache.k[:, :, :1]) == 0  # zeros, as torch.zeros
    assert resident_mib() - before < 32
    cache.k[:, :, :4096] = 1.0  # half the keys written: half their memory
    grown = resident_mib() - before
    assert 48 < grown < 100
    assert float(cache.k[:, :, 4096:].abs().sum()) == 0.0
