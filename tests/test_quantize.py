"""Weight-only int8: the per-channel rounding, the int8 layers, and quantized runs."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F
from torch import nn

import monotile
from monotile.infer.quantize import (Int8Embedding, Int8Linear, quantize_int8, quantize_rows,
                                     weight_bytes)
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
