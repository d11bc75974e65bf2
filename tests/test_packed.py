"""oneDNN-packed linear layers for CPU inference: the same products, the same tokens, the same
saved weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import monotile
from monotile.infer import native
from monotile.infer.generate import Sampling, generate_ids
from monotile.infer.packed import (HINTS, PackedLinear, layouts, pack_linears,
                                   packing_available, time_ways)

from conftest import cli

pytestmark = pytest.mark.skipif(not packing_available("cpu", torch.float32),
                                reason="this PyTorch build has no oneDNN")


def test_a_packed_layer_computes_x_w_transpose_plus_b():
    torch.manual_seed(0)
    linear = nn.Linear(96, 40)
    packed = PackedLinear.from_linear(linear).eval()
    for x in (torch.randn(1, 96), torch.randn(2, 5, 96), torch.randn(4, 192)[:, ::2]):
        torch.testing.assert_close(packed(x), x @ linear.weight.T + linear.bias,
                                   atol=1e-5, rtol=1e-5)
    assert torch.equal(packed.weight, linear.weight.detach())
    no_bias = PackedLinear.from_linear(nn.Linear(96, 40, bias=False)).eval()
    assert no_bias(torch.randn(3, 96)).shape == (3, 40)
    # laid out for 32 rows (an encoder's sentence): the same product at any row count
    for_rows = PackedLinear.from_linear(linear, rows=32).eval()
    for x in (torch.randn(1, 96), torch.randn(1, 33, 96), torch.randn(70, 96)):
        torch.testing.assert_close(for_rows(x), x @ linear.weight.T + linear.bias,
                                   atol=1e-5, rtol=1e-5)
    twin = copy.deepcopy(for_rows)
    assert twin.rows == 32 and torch.equal(twin.weight, linear.weight.detach())


@pytest.mark.skipif(not packing_available("cpu", torch.bfloat16),
                    reason="this CPU has no bf16 instructions")
def test_a_packed_bf16_layer_matches_the_bf16_product():
    torch.manual_seed(0)
    linear = nn.Linear(128, 64).to(torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    out = PackedLinear.from_linear(linear).eval()(x)
    assert out.dtype == torch.bfloat16
    # both accumulate in fp32 and round once to bf16: within one bf16 step of each other
    torch.testing.assert_close(out, F.linear(x, linear.weight, linear.bias), atol=0.05,
                               rtol=2 ** -7)


def test_a_packed_model_decodes_the_same_tokens_and_saves_the_same_weights(tiny_run):
    model = copy.deepcopy(tiny_run.model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    prompt = torch.randint(0, model.trunk.cfg.vocab_size, (2, 7))
    with torch.no_grad():
        logits = model(prompt)
    greedy = Sampling(temperature=0.0)
    tokens = torch.stack(list(generate_ids(model, prompt, 24, greedy)))
    names = pack_linears(model)
    assert "head" in names and all(not isinstance(m, nn.Linear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), logits, atol=1e-4, rtol=1e-4)
    assert torch.equal(torch.stack(list(generate_ids(model, prompt, 24, greedy))), tokens)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    fresh = copy.deepcopy(tiny_run.model)
    fresh.load_state_dict(after)  # a packed model's weights load into a plain one
    again = copy.deepcopy(model)  # and a packed model copies
    again.load_state_dict(before)
    with torch.no_grad():
        torch.testing.assert_close(again(prompt), logits, atol=1e-4, rtol=1e-4)
    model.train()
    with pytest.raises(RuntimeError, match="for inference"):
        model(prompt)


def test_layouts_are_timed_together_and_each_shape_keeps_its_fastest(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    # two shapes of a decoding step and one of a 32-row encoder, timed in one pass: every
    # way's layers multiply as nn.Linear does, each shape's time its own layers' calls
    shapes = {(256, 512, 1): 3, (512, 256, 1): 2, (64, 96, 32): 1}
    made = []

    def maker(hint):
        def make(w, shape):
            linear = nn.Linear(shape[0], shape[1], bias=False)
            linear.weight = nn.Parameter(w, requires_grad=False)
            layer = PackedLinear.from_linear(linear, hint).eval() if hint else linear
            made.append((layer, linear))
            return layer
        return make
    times = time_ways(shapes, {"plain": maker(0), "16": maker(16)})
    assert set(times) == {"plain", "16"} and all(t.keys() == shapes.keys() for t in times.values())
    assert all(0 < t < 1 for way in times.values() for t in way.values())
    assert len(made) == 2 * 6  # one layer a count, for each way
    x = torch.randn(1, 512)
    for layer, linear in made:
        with torch.no_grad():
            torch.testing.assert_close(layer(x[:, :linear.in_features]),
                                       linear(x[:, :linear.in_features]), atol=1e-4, rtol=1e-4)
    chosen = layouts(shapes, torch.float32)
    assert chosen.keys() == shapes.keys()
    assert all(chosen[shape] in (0, shape[2], *HINTS) for shape in shapes)


def test_a_run_optimized_for_inference_generates_what_it_did(tiny_run):
    run = monotile.load(tiny_run.dir)
    text = run.generate("ROMEO:", max_new_tokens=40, temperature=0.0)
    parameters = run.parameters()
    assert run.optimize_for_inference() is run
    # packed where that measured faster on this CPU: all layers of one shape alike
    layouts = {}
    for m in run.model.modules():
        if isinstance(m, (nn.Linear, PackedLinear)):
            layouts.setdefault((m.in_features, m.out_features), set()).add(type(m))
    assert layouts and all(len(kinds) == 1 for kinds in layouts.values())
    assert run.parameters() == parameters  # packed weights are no longer nn.Parameters
    assert run.generate("ROMEO:", max_new_tokens=40, temperature=0.0) == text


@pytest.mark.skipif(not packing_available("cpu", torch.bfloat16),
                    reason="this CPU has no bf16 instructions")
def test_generate_decodes_with_bf16_weights_and_refuses_other_dtypes(tiny_run):
    done = cli("generate", str(tiny_run.dir), "--prompt", "ROMEO:", "--max-new-tokens", "30",
               "--temperature", "0", "--dtype", "bfloat16", "--json")
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["text"]) > 0
    run = monotile.load(tiny_run.dir).optimize_for_inference("bfloat16")
    head = run.model.head  # packed, plain, or in the native kernels' layout
    assert (head.packed if isinstance(head, native.NativeLinear) else head.weight).dtype \
        == torch.bfloat16
    bad = cli("generate", str(tiny_run.dir), "--prompt", "x", "--dtype", "float16")
    assert bad.returncode == 2 and "float16" in bad.stderr
    with pytest.raises(monotile.errors.ConfigError, match="choose float32, bfloat16, int8, int4"):
        monotile.load(tiny_run.dir).optimize_for_inference("int3")


def test_a_measured_layout_is_remembered_per_machine_and_shape(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    model = nn.Sequential(nn.Linear(64, 128), nn.Linear(128, 64))
    pack_linears(copy.deepcopy(model), measure=True)
    verdicts_file = tmp_path / "monotile" / "layouts.json"
    doc = json.loads(verdicts_file.read_text())
    (machine, verdicts), = doc.items()
    keys = ("1 x 64->128 float32 @ 1 rows in a pass", "1 x 128->64 float32 @ 1 rows in a pass")
    assert "threads" in machine and set(verdicts) == set(keys)
    assert all(verdicts[k] in (0, 1, *HINTS) for k in keys)  # plain, or a packing's hint
    # the next start takes the verdicts as they are, measuring nothing
    for first, second, replaced in ((16, 0, ["0"]), (0, 1, ["1"]), (1, 16, ["0", "1"])):
        doc[machine] = {keys[0]: first, keys[1]: second}
        verdicts_file.write_text(json.dumps(doc))
        packed = copy.deepcopy(model)
        assert pack_linears(packed, measure=True) == replaced
        assert [packed[int(n)].rows for n in replaced] == [h for h in (first, second) if h]
    verdicts_file.write_text("{not json")  # a damaged file: measured again, and rewritten
    pack_linears(copy.deepcopy(model), measure=True)
    assert len(json.loads(verdicts_file.read_text())[machine]) == 2
    doc[machine] = {keys[0]: True, keys[1]: "yes"}  # not a layout: measured again
    verdicts_file.write_text(json.dumps(doc))
    pack_linears(copy.deepcopy(model), measure=True)
    assert all(isinstance(v, int) and not isinstance(v, bool)
               for v in json.loads(verdicts_file.read_text())[machine].values())
    # x of 32 rows is another verdict: measured at 32 rows, kept beside the others
    packed = copy.deepcopy(model)
    names = pack_linears(packed, measure=True, rows=32)
    verdicts = json.loads(verdicts_file.read_text())[machine]
    wide = ("1 x 64->128 float32 @ 32 rows in a pass", "1 x 128->64 float32 @ 32 rows in a pass")
    assert set(wide) < set(verdicts) and all(verdicts[k] in (0, 32, *HINTS) for k in wide)
    assert names == [n for n, k in (("0", wide[0]), ("1", wide[1])) if verdicts[k]]
    assert all(packed[int(n)].rows == verdicts[wide[int(n)]] for n in names)
