"""The gpt2-124m preset and the plan for one 8-GPU node: GPT-2 small's shape and parameter
count against Hugging Face's GPT-2, a two-step CPU run at a reduced size, docs/scaling.md's
pasted budget as `explain` prints it now, and activation checkpointing under FSDP2."""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from monotile.core.transformer import count_parameters
from monotile.modalities.text import LanguageModel
from monotile.presets import PRESETS
from monotile.rundir import build_configs

from conftest import cli

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpt2_124m_preset_is_gpt2_small_with_half_a_million_tokens_a_step():
    from transformers import GPT2Config, GPT2LMHeadModel
    configs = build_configs("text", PRESETS["gpt2-124m"])
    cfg, train = configs["model"], configs["train"]
    with torch.device("meta"):
        ours = LanguageModel(cfg)
        gpt2_vocabulary = LanguageModel(cfg.replace(vocab_size=50257))
        reference = GPT2LMHeadModel(GPT2Config(vocab_size=50304, n_positions=1024, n_embd=768,
                                               n_layer=12, n_head=12))
    assert count_parameters(ours) == reference.num_parameters() == 124_475_904
    assert count_parameters(gpt2_vocabulary) == 124_439_808  # GPT-2's own: 124.44M
    embeddings = (50257 + 1024) * 768  # token and position embeddings
    assert count_parameters(gpt2_vocabulary) - embeddings == 85_056_000  # 85M non-embedding
    assert cfg.vocab_size % 64 == 0 and configs["text"].bpe_vocab == 50257
    assert train.batch_size * train.grad_accum * cfg.context == 524_288
    assert train.max_steps * 524_288 == pytest.approx(10e9, rel=1e-3)  # 10B tokens
    assert (train.lr, train.min_lr, train.beta1, train.beta2, train.warmup_steps,
            train.weight_decay, train.grad_clip) == (6e-4, 6e-5, 0.9, 0.95, 715, 0.1, 1.0)


def test_gpt2_124m_trains_twenty_steps_from_shards_on_a_cpu_at_a_reduced_size(small_text,
                                                                             tmp_path):
    """The issue's smoke run: the preset's recipe at a reduced size (2 layers, width 32,
    context 32), 20 steps from token shards of a GPT-2-style byte-level BPE with an
    end-of-text token; the embedding keeps the preset's padded 50,304 rows."""
    from monotile.tokenizers import Tokenizer
    tok = Tokenizer.train_bpe(small_text.read_text(encoding="utf-8"), 300)
    tok.tok.add_special_tokens(["<|endoftext|>"])
    tok.save(tmp_path / "tokenizer.json")
    shards = tmp_path / "shards"
    done = cli("prepare", "text", "--data", str(small_text), "--tokenizer",
               str(tmp_path / "tokenizer.json"), "--out", str(shards), "--val-fraction", "0.1",
               "--quiet")
    assert done.returncode == 0, done.stderr
    out = tmp_path / "gpt2"
    done = cli("train", "text", "--preset", "gpt2-124m", "--data", str(shards), "--out",
               str(out), "--quiet", "--set", "n_layer=2", "n_head=2", "d_model=32",
               "context=32", "batch_size=4", "grad_accum=2", "max_steps=20", "eval_interval=20",
               "warmup_steps=2", "eval_tokens=512", "compile=false", "activation_checkpointing=1")
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["beta2"] == 0.95 and config["train"]["grad_accum"] == 2
    assert config["model"]["mlp"] == "gelu_tanh" and config["model"]["positions"] == "learned"
    assert config["model"]["vocab_size"] == 50304  # the preset's padding, not the 301 tokens
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    last = [r for r in records if "eval" in r][-1]
    assert last["step"] == 20 and math.isfinite(last["eval"]["val_loss"])
    assert losses[-1] < losses[0]  # 20 steps from ln(50,304) = 10.8 learn something


def test_docs_scaling_pastes_what_explain_prints_for_the_node():
    page = (ROOT / "docs" / "scaling.md").read_text()
    found = re.findall(r"<!-- explain output: (monotile explain [^>]*?) -->\n```\n(.*?)```",
                       page, re.S)
    assert found, "docs/scaling.md has no pasted explain output"
    for command, pasted in found:
        done = cli(*shlex.split(command)[1:])
        assert done.returncode == 0, done.stderr
        assert done.stdout == pasted, command


PROBE = """
import json
import torch
import torch.nn.functional as F
from monotile.core.transformer import ModelConfig, init_weights
from monotile.modalities.text import LanguageModel
from monotile.train import distributed

ctx = distributed.setup("fsdp")
cfg = ModelConfig(vocab_size=50, n_layer=3, n_head=2, d_model=32, context=16)
x = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
models = []
for k in (0, 1):
    torch.manual_seed(0)
    models.append(LanguageModel(cfg.replace(activation_checkpointing=k)))
    init_weights(models[-1], cfg.n_layer)
plain, sharded = models
distributed.wrap(sharded, ctx)  # FSDP2: each block a unit, then the rest
grads = []
for model, rows in ((plain, x), (sharded, distributed.shard(x, ctx))):
    F.cross_entropy(model(rows).flatten(0, 1), rows.flatten()).backward()
    grads.append({n: distributed.full_tensor(p.grad) for n, p in model.named_parameters()})
if ctx.main:
    print(json.dumps({"max_diff": max((grads[1][n] - g).abs().max().item()
                                      for n, g in grads[0].items()),
                      "tensors": len(grads[0])}))
distributed.shutdown()
"""


def test_activation_checkpointing_under_fsdp2_gives_one_process_gradients(tmp_path):
    """Two processes, every block sharded (fully_shard) and recomputed in backward: the
    gathered gradients are those of one process training the whole batch without either."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(probe)], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["tensors"] > 10 and result["max_diff"] < 1e-6
