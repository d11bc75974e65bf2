"""Weight-only int8 and int4: the rounding, the layers, and quantized runs."""

from __future__ import annotations

import json
import threading

import torch
import torch.nn.functional as F
from torch import nn

import monotile
from monotile.infer import native, quantize
from monotile.infer.convert import convert
from monotile.infer.quantize import (GEMM_ROWS, GEMM_ROWS_TRIED, Int4Linear, Int8Embedding,
                                     Int8Linear, int8_gemm, quantize_groups_int4,
                                     quantize_int8, quantize_rows, tune_gemm_rows, weight_bytes,
                                     workspace)
from monotile.train.checkpoint import model_tensors

from conftest import cli


def test_each_row_is_rounded_to_127_steps_of_its_own_scale():
    torch.manual_seed(0)
    w = torch.randn(5, 9) * torch.tensor([0.01, 0.1, 1.0, 10.0, 100.0])[:, None]
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    torch.testing.assert_close(s, w.abs().max(dim=1).values / 127)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()


def test_int8_layers_compute_with_the_rounded_weights():
    torch.manual_seed(0)
    linear, emb = nn.Linear(64, 48), nn.Embedding(30, 64)
    x, idx = torch.randn(7, 64), torch.tensor([[0, 29, 3]])
    layer = Int8Linear.from_linear(linear)
    q, s = quantize_rows(linear.weight)
    reference = F.linear(x, q.float() * s[:, None], linear.bias)
    # the CPU kernel multiplies in bf16: 8 bits of mantissa
    torch.testing.assert_close(layer(x), reference, atol=0.02, rtol=0.02)
    for k in (8, 24):  # feature counts the CPU kernel cannot take (a series' patch of 8)
        narrow, xs = Int8Linear.from_linear(nn.Linear(k, 65)), torch.randn(3, k)
        torch.testing.assert_close(narrow(xs), F.linear(xs, narrow.dequantized(), narrow.bias))
    model = nn.ModuleDict({"emb": emb})
    quantize_int8(model)
    assert isinstance(model["emb"], Int8Embedding)
    q, s = quantize_rows(emb.weight)
    torch.testing.assert_close(model["emb"](idx), (q.float() * s[:, None])[idx])


def test_many_rows_multiply_as_integers_rounded_a_row_at_a_time():
    """int8_gemm: dx = max|x| / 127 a row, X = round(x / dx), y = (X Q^T) dx s, the integer
    sums exact (against int64 arithmetic); a row of zeros gives zeros, and the product stays
    within the roundings of the float one."""
    torch.manual_seed(0)
    w, x = torch.randn(40, 96), torch.randn(70, 96) * torch.logspace(-3, 3, 70)[:, None]
    x[5] = 0
    q, s = quantize_rows(w)
    dx = x.abs().amax(1, keepdim=True) / 127
    X = torch.round(x / dx.clamp_min(1e-30)).long()
    exact = (X @ q.long().t()).double() * dx.double() * s.double()
    y = int8_gemm(x, q, s)
    assert y.dtype == torch.float32 and (y[5] == 0).all()
    torch.testing.assert_close(y.double(), exact, rtol=1e-6, atol=0)
    float_product = x @ (q.float() * s[:, None]).t()
    assert ((y - float_product).abs() <= 0.02 * float_product.abs().amax(1, keepdim=True)).all()


def test_a_quantized_run_is_a_quarter_of_the_size_and_loses_under_1_percent(tiny_run,
                                                                            tmp_path):
    out = tmp_path / "int8"
    done = cli("quantize", str(tiny_run.dir), "--int8", "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["bytes_after"] < 0.4 * figures["bytes_before"]
    assert (out / "model.safetensors").stat().st_size < \
        0.4 * (tiny_run.dir / "model.safetensors").stat().st_size
    q = monotile.load(out)
    head, emb = q.model.head, q.model.tok_emb
    assert isinstance(head, Int8Linear) and head.weight_int8 is emb.weight_int8  # still tied
    assert sum(".weight_int8" in k for k in model_tensors(q.model)) == \
        sum(isinstance(m, (Int8Linear, Int8Embedding)) for m in q.model.modules()) - 1
    fp32 = tiny_run.evaluate()["val_loss"]
    assert abs(q.evaluate()["val_loss"] - fp32) / fp32 < 0.01
    assert weight_bytes(q.model) == figures["bytes_after"]
    text = q.generate("ROMEO:", max_new_tokens=20, temperature=0.0)
    assert len(text) == 20
    done = cli("eval", str(out), "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["val_loss"] > 0


def test_quantize_refuses_what_it_cannot_do_and_writes_nothing(tiny_run, tmp_path):
    out = tmp_path / "int8"
    assert cli("quantize", str(tiny_run.dir), "--int8", "--out", str(out)).returncode == 0
    done = cli("quantize", str(out), "--int8", "--out", str(tmp_path / "again"))
    assert done.returncode == 2 and "already quantized" in done.stderr
    assert not (tmp_path / "again").exists()
    done = cli("quantize", str(tiny_run.dir), "--int8", "--out", str(out))
    assert done.returncode == 2 and "already holds a run" in done.stderr
    done = cli("quantize", str(tiny_run.dir), "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and "--int8" in done.stderr


def test_int4_rounds_each_group_of_32_to_16_steps_from_its_minimum():
    torch.manual_seed(0)
    w = torch.randn(16, 96) * torch.rand(16, 1) * 10
    q, d, m = quantize_groups_int4(w)
    assert q.min() == 0 and q.max() == 15 and d.shape == m.shape == (16, 3)
    groups = w.view(16, 3, 32)
    torch.testing.assert_close(m, groups.amin(-1))
    torch.testing.assert_close(d, (groups.amax(-1) - groups.amin(-1)) / 15)
    back = q.view(16, 3, 32).float() * d[..., None] + m[..., None]
    assert ((back - groups).abs() <= d[..., None] / 2 + 1e-5).all()
    # a few rows at a time (the temporaries small), the same Q, d and m
    for a, b in zip(quantize_groups_int4(w, chunk=5), (q, d, m)):
        assert torch.equal(a, b)


def test_int4_layers_compute_with_the_rounded_weights_and_keep_q4_1_values():
    torch.manual_seed(0)
    linear, x = nn.Linear(128, 64), torch.randn(5, 128)
    layer = Int4Linear(linear)
    q, d, m = quantize_groups_int4(linear.weight)
    weights = (q.view(64, 4, 32).float() * d[..., None] + m[..., None]).view(64, 128)
    # the kernel holds d and min + 8 d in bf16 and multiplies bf16 activations
    torch.testing.assert_close(layer.dequantized(), weights, atol=0.02, rtol=2 ** -7)
    exact = F.linear(x.bfloat16().float(), layer.dequantized(), linear.bias)
    torch.testing.assert_close(layer(x), exact, atol=0.02, rtol=0.01)
    torch.testing.assert_close(layer(x), F.linear(x, weights, linear.bias), atol=0.1, rtol=0.02)
    for n_out in (36, 72):  # outputs the kernel's packing cannot take (not a multiple of 16)
        odd = Int4Linear(nn.Linear(64, n_out))
        xs = torch.randn(3, 64)
        torch.testing.assert_close(odd(xs), F.linear(xs, odd.dequantized(), odd.bias))
    # llama.cpp's Q4_1 of a tensor, dequantized (as import gguf does), rounds back to itself
    import gguf
    w = torch.randn(64, 128).numpy()
    kind = gguf.GGMLQuantizationType.Q4_1
    from_file = torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w, kind), kind))
    q, d, m = quantize_groups_int4(from_file)
    again = (q.view(64, 4, 32).float() * d[..., None] + m[..., None]).view(64, 128)
    torch.testing.assert_close(again, from_file.float(), atol=1e-6, rtol=0)


def test_a_prompts_rows_multiply_the_same_weights_as_one_row_does():
    """From GEMM_ROWS rows on, one GEMM instead of the weight-only kernels (int8: x rounded
    to 8 bits a row, an integer GEMM; int4: W dequantized to bf16): the same weights, row for
    row, to those roundings."""
    torch.manual_seed(0)
    for n_out in (128, 192):  # 128: Q unpacked from the kernel's blocks of 64; 192 too
        linear = nn.Linear(96, n_out)
        for layer in (Int8Linear.from_linear(linear), Int4Linear(linear)):
            x = torch.randn(GEMM_ROWS + 5, 96)
            one_by_one = torch.cat([layer(row[None]) for row in x])
            many = layer(x)
            assert many.shape == (GEMM_ROWS + 5, n_out)
            torch.testing.assert_close(many, one_by_one, atol=0.02, rtol=0.02)
            torch.testing.assert_close(many, F.linear(x, layer.dequantized(), layer.bias),
                                       atol=0.02, rtol=0.02)
    packed = Int4Linear(nn.Linear(64, 128))
    assert packed.unpacks  # the layout read back equals Q (else the kernel does all)
    assert Int4Linear(nn.Linear(64, 640)).unpacks  # checked 512 rows at a time
    assert not Int4Linear(nn.Linear(64, 80)).unpacks  # 80 rows: not whole blocks of 64


def test_layers_of_several_shapes_dequantize_into_one_buffer_a_dtype(monkeypatch):
    # a prompt through int4 layers of three shapes in turn: each product as the layer's own W
    # gives it, the bf16 W of all written into one buffer, the largest's size
    monkeypatch.setattr(quantize, "_workspaces", threading.local())  # none kept before
    torch.manual_seed(0)
    layers = [Int4Linear(nn.Linear(64, 256)), Int4Linear(nn.Linear(64, 128)),
              Int4Linear(nn.Linear(64, 64))]
    x = torch.randn(GEMM_ROWS, 64)
    for layer in [*layers, *layers]:
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized(), layer.bias),
                                   atol=0.02, rtol=0.02)
    small, large = workspace((64, 64), torch.bfloat16, "cpu"), workspace((256, 64),
                                                                          torch.bfloat16, "cpu")
    assert small.data_ptr() == large.data_ptr()
    assert large.untyped_storage().nbytes() == 256 * 64 * 2


def test_a_prompts_rows_take_the_kernel_or_one_gemm_as_this_machine_measured(tmp_path,
                                                                            monkeypatch):
    # from how many rows each layer's product is faster as one GEMM: timed once on the model's
    # own layers, kept per machine; below it the kernel, from it the GEMM (int8: x rounded to 8
    # bits, int8_gemm's product exactly; int4: its bf16 W the only workspace made), the same
    # product either way
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    torch.manual_seed(0)
    model = nn.Sequential(Int8Linear.from_linear(nn.Linear(64, 128)),
                          Int4Linear(nn.Linear(128, 64)))
    tune_gemm_rows(model)
    doc = json.loads((tmp_path / "monotile" / "layouts.json").read_text())
    (machine, verdicts), = doc.items()
    keys = ["Int8Linear 64->128: one GEMM from rows", "Int4Linear 128->64: one GEMM from rows"]
    assert "threads" in machine and sorted(verdicts) == sorted(keys)
    assert [layer.gemm_rows for layer in model] == [verdicts[k] for k in keys]
    assert all(verdicts[k] in (*GEMM_ROWS_TRIED, 2 * GEMM_ROWS_TRIED[-1]) for k in keys)
    for layer in model:
        for rows, gemm in ((layer.gemm_rows - 1, False), (layer.gemm_rows, True)):
            monkeypatch.setattr(quantize, "_workspaces", threading.local())
            x = torch.randn(rows, layer.in_features)
            torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized(), layer.bias),
                                       atol=0.02, rtol=0.02)
            if isinstance(layer, Int8Linear):
                rounded = int8_gemm(x, layer.weight_int8, layer.scale) + layer.bias
                assert torch.equal(layer(x), rounded) == gemm, rows
            else:
                made = getattr(quantize._workspaces, "buffers", {})
                assert ((torch.bfloat16, torch.device("cpu")) in made) == gemm, (rows, made)
    # the next start takes the verdicts as they are, timing nothing
    doc[machine] = {keys[0]: 64, keys[1]: 256}
    (tmp_path / "monotile" / "layouts.json").write_text(json.dumps(doc))
    monkeypatch.setattr(quantize, "_time_gemm_rows", None)  # a call would fail
    fresh = nn.Sequential(Int8Linear.from_linear(nn.Linear(64, 128)),
                          Int4Linear(nn.Linear(128, 64)))
    assert [layer.gemm_rows for layer in fresh] == [GEMM_ROWS, GEMM_ROWS]
    tune_gemm_rows(fresh)
    assert [layer.gemm_rows for layer in fresh] == [64, 256]


def test_an_int4_model_keeps_its_head_at_8_bits_and_generates(tiny_run):
    run = monotile.load(tiny_run.dir)
    text = run.generate("ROMEO:", max_new_tokens=30, temperature=0.0)
    model = run.optimize_for_inference("int4").model
    # (in the native kernels where they build: Run.optimize_for_inference)
    assert isinstance(model.head, (Int8Linear, native.NativeInt8Linear))
    assert any(isinstance(m, (Int4Linear, native.NativeInt4Linear)) for m in model.modules())
    assert not any(type(m) is nn.Linear and m.in_features % 32 == 0 for m in model.modules())
    assert len(run.generate("ROMEO:", max_new_tokens=30, temperature=0.0)) == len(text)
    done = cli("generate", str(tiny_run.dir), "--prompt", "ROMEO:", "--max-new-tokens", "20",
               "--temperature", "0", "--dtype", "int4", "--ignore-eos", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["new_tokens"] == 20
    small = nn.Sequential(nn.Linear(8, 8))
    convert(small, "int4", pack=False)
    assert type(small[0]) is nn.Linear  # no whole group of 32 inputs: left alone
