"""Several processes (torchrun, gloo on CPU): DDP and FSDP2 train the very model one process
trains on the same global batch, and a checkpoint resumes on any number of processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import monotile

from conftest import set_args

# 2 processes x 4 rows = the global batch of 8; eval every 3 steps, log every step
SMALL = {"n_layer": "2", "n_head": "2", "d_model": "32", "context": "16", "batch_size": "8",
         "max_steps": "6", "eval_interval": "3", "log_interval": "1", "warmup_steps": "2",
         "eval_tokens": "2000", "seed": "0"}


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m monotile ARGS`, as a user runs it."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "monotile", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def weights(run_dir) -> dict[str, torch.Tensor]:
    """The run's last weights: model.safetensors, or an FSDP run's shards read whole."""
    if (run_dir / "model.safetensors").exists():
        return load_file(str(run_dir / "model.safetensors"))
    from monotile.train.checkpoint import model_tensors
    return model_tensors(monotile.load(run_dir).model)


def losses(run_dir) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


def assert_same_model(a, b, atol=1e-5):
    wa, wb = weights(a), weights(b)
    assert sorted(wa) == sorted(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], atol=atol, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_text):
    """The reference: one process, the whole global batch of 8."""
    out = tmp_path_factory.mktemp("dist") / "single"
    monotile.train("text", out=out, data=small_text, overrides=dict(SMALL), quiet=True)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_the_model_one_process_trains(strategy, single, small_text,
                                                          tmp_path):
    out = tmp_path / strategy
    done = torchrun("train", "text", "--data", str(small_text), "--out", str(out),
                    "--strategy", strategy, "--json", *set_args(SMALL))
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])  # only the main process reports
    assert len(done.stdout.strip().splitlines()) == 1 and figures["step"] == 6
    assert_same_model(out, single)
    assert losses(out) == pytest.approx(losses(single), rel=1e-5)
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["tokens"] == 6 * 8 * 16  # counted over both processes


def test_a_checkpoint_resumes_on_another_number_of_processes(single, small_text, tmp_path):
    two_then_one, one_then_two = tmp_path / "2to1", tmp_path / "1to2"
    done = torchrun("train", "text", "--data", str(small_text), "--out", str(two_then_one),
                    "--strategy", "fsdp", "--stop-at", "3", "--quiet", *set_args(SMALL))
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((two_then_one / "trainer_state.json").read_text())["step"] == 3
    monotile.resume(two_then_one, quiet=True)

    monotile.train("text", out=one_then_two, data=small_text, overrides=dict(SMALL), quiet=True,
                   until_step=3)
    done = torchrun("resume", str(one_then_two), "--strategy", "ddp", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    for run in (two_then_one, one_then_two):
        assert json.loads((run / "trainer_state.json").read_text())["step"] == 6
        assert_same_model(run, single)


def test_a_batch_that_does_not_split_over_the_processes_is_refused(small_text, tmp_path):
    out = tmp_path / "odd"
    done = torchrun("train", "text", "--data", str(small_text), "--out", str(out),
                    *set_args(dict(SMALL, batch_size="7")))
    assert done.returncode != 0
    assert "error: batch_size=7 does not split evenly over 2 processes" in done.stderr
    assert not out.exists()
    done = torchrun("train", "text", "--data", str(small_text), "--out", str(out),
                    "--strategy", "fsdp", *set_args(dict(SMALL, ema="0.9")))
    assert done.returncode != 0 and "error: ema is not supported with --strategy fsdp" in \
        done.stderr
    assert not out.exists()


def test_each_process_keeps_its_own_rows_of_the_global_batch():
    from monotile.train.distributed import Context, shard
    x = torch.arange(8)[:, None].expand(8, 3)
    batch = {"x": x, "pair": (x, x + 100)}
    parts = [shard(batch, Context(rank=r, world=2)) for r in range(2)]
    assert torch.equal(torch.cat([p["x"] for p in parts]), x)
    assert parts[1]["x"][:, 0].tolist() == [4, 5, 6, 7]
    assert torch.equal(parts[1]["pair"][1], x[4:] + 100)


def test_the_memory_table_counts_what_the_processes_hold(tmp_path):
    from monotile.core.transformer import ModelConfig, init_weights
    from monotile.modalities.text import LanguageModel
    from monotile.train.distributed import memory_per_process
    from monotile.train.optim import make_optimizer
    cfg = ModelConfig(vocab_size=50, n_layer=3, n_head=2, d_model=32, context=16, bias=True)
    model = LanguageModel(cfg)
    init_weights(model, cfg.n_layer)
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99)
    x = torch.randint(0, 50, (4, 16))
    torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
    opt.step()
    single = memory_per_process(model, "single", 1, batch=4, context=16)
    held = {"weights": sum(p.numel() for p in model.parameters()),
            "gradients": sum(p.grad.numel() for p in model.parameters()),
            "adamw_moments": sum(v.numel() for st in opt.state.values()
                                 for k, v in st.items() if k != "step")}
    for name, values in held.items():
        assert single[name] == 4 * values, name

    probe = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc-per-node=2", str(os.path.join(os.path.dirname(__file__),
                                                                   "fsdp_probe.py"))],
                           capture_output=True, text=True, timeout=300,
                           env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert probe.returncode == 0, probe.stderr[-3000:]
    sharded = json.loads(probe.stdout.strip().splitlines()[-1])
    fsdp = memory_per_process(model, "fsdp", 2, batch=4, context=16)
    # FSDP2 pads each tensor's first dimension to a multiple of the processes: within 1 %
    assert 4 * sharded["weights"] == pytest.approx(fsdp["weights"], rel=0.01)
    assert 4 * sharded["gradients"] == pytest.approx(fsdp["gradients"], rel=0.01)
    assert 4 * sharded["moments"] == pytest.approx(fsdp["adamw_moments"], rel=0.01)
