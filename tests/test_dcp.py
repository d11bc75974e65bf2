"""FSDP checkpoints with torch.distributed.checkpoint: every process writes its own shards and
no process holds the whole model; a save that fails or is killed leaves the last checkpoint;
a run resumes on any number of processes; one process loads, generates from and consolidates
a sharded run into the files a gathered save writes."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import monotile
from monotile.train.checkpoint import JOURNAL

from conftest import cli, set_args
from test_distributed import SMALL, assert_same_model, torchrun, weights


def state_of(run) -> dict:
    return json.loads((run / "trainer_state.json").read_text())


def shard_files(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".safetensors")


@pytest.fixture(scope="module")
def single(tmp_path_factory, small_text):
    """The reference: one process, the whole global batch of 8."""
    out = tmp_path_factory.mktemp("dcp") / "single"
    monotile.train("text", out=out, data=small_text, overrides=dict(SMALL), quiet=True)
    return out


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, small_text):
    """Two processes, FSDP, to the end (steps 3 and 6 evaluated and checkpointed)."""
    out = tmp_path_factory.mktemp("dcp") / "fsdp"
    done = torchrun("train", "text", "--data", str(small_text), "--out", str(out),
                    "--strategy", "fsdp", "--quiet", *set_args(SMALL))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, small_text):
    """Two processes, FSDP, stopped after step 3 (checkpointed, sharded)."""
    out = tmp_path_factory.mktemp("dcp") / "stopped"
    done = torchrun("train", "text", "--data", str(small_text), "--out", str(out),
                    "--strategy", "fsdp", "--stop-at", "3", "--quiet", *set_args(SMALL))
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def copy(run, to):
    shutil.copytree(run, to)
    return to


def test_fsdp_writes_one_shard_file_per_process_and_no_gathered_file(fsdp_run, single):
    state = state_of(fsdp_run)
    assert state["step"] == 6 and state["checkpoint"] == "checkpoint-6"
    folder = fsdp_run / state["checkpoint"]
    files = shard_files(folder)
    assert files == ["shard-00001-model-00001-of-00001.safetensors",
                     "shard-00002-model-00001-of-00001.safetensors"]
    for name in ("model.safetensors", "optimizer.safetensors", "best.safetensors", JOURNAL):
        assert not (fsdp_run / name).exists(), name
    # the older checkpoint is gone; the best weights are a sharded folder of their own
    folders = sorted(p.name for p in fsdp_run.iterdir() if p.is_dir() and p.name != "plots")
    assert folders == sorted({"checkpoint-6", state["best_checkpoint"]})
    assert shard_files(fsdp_run / state["best_checkpoint"]) == files
    # each process wrote its half of the weights: rows [0, n/2) and [n/2, n) of each tensor
    held = []
    for name in files:
        with safe_open(str(folder / name), framework="pt") as f:
            held.append(sum(f.get_slice(k).get_shape()[0] for k in f.keys()
                            if k == "model.tok_emb.weight"))
    assert min(held) > 0 and abs(held[0] - held[1]) <= 1
    # read back in one process: the model one process trains (float rounding apart)
    assert_same_model(fsdp_run, single)


def test_generate_and_eval_read_a_sharded_run_in_one_process(fsdp_run, single):
    done = cli("generate", str(fsdp_run), "--prompt", "ROMEO:", "--max-new-tokens", "8",
               "--seed", "0")
    assert done.returncode == 0, done.stderr
    assert len(done.stdout.rstrip("\n")) == 8  # 8 characters, after the prompt
    assert done.stdout == cli("generate", str(single), "--prompt", "ROMEO:",
                              "--max-new-tokens", "8", "--seed", "0").stdout
    done = cli("eval", str(fsdp_run), "--checkpoint", "best", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["val_loss"] == pytest.approx(state_of(fsdp_run)["best"],
                                                                rel=1e-4)


def test_consolidate_writes_the_files_of_a_gathered_save(fsdp_run, single, tmp_path):
    run = copy(fsdp_run, tmp_path / "run")
    whole = tmp_path / "weights.safetensors"
    done = cli("consolidate", str(run), "--out", str(whole))
    assert done.returncode == 0, done.stderr
    assert sorted(load_file(str(whole))) == sorted(weights(single))  # tied weights once
    assert state_of(run)["checkpoint"] == "checkpoint-6"  # --out leaves the run as it is

    done = cli("consolidate", str(run), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["sharded"] == ["last", "best"]
    state = state_of(run)
    assert "checkpoint" not in state and "best_checkpoint" not in state
    assert not [p for p in run.iterdir() if p.is_dir() and p.name != "plots"]
    for name, t in load_file(str(whole)).items():
        assert torch.equal(weights(run)[name], t), name
    assert load_file(str(run / "optimizer.safetensors"))
    assert (run / "best.safetensors").exists()
    again = cli("consolidate", str(run))
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_resume_on_one_and_on_two_processes_equals_the_straight_run(stopped, single, tmp_path):
    state = state_of(stopped)
    assert state["step"] == 3 and state["checkpoint"] == "checkpoint-3"
    one, two, files = (copy(stopped, tmp_path / n) for n in ("one", "two", "files"))

    monotile.resume(one, quiet=True)  # 2 processes -> 1: DCP reshards on load
    assert state_of(one)["step"] == 6 and "checkpoint" not in state_of(one)
    assert not (one / "checkpoint-3").exists()  # the sharded folder gave way to the files
    assert_same_model(one, single)

    done = torchrun("resume", str(two), "--strategy", "fsdp", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert state_of(two)["checkpoint"] == "checkpoint-6"
    assert not (two / "checkpoint-3").exists()
    assert_same_model(two, single)

    # consolidated, the same checkpoint resumes on one process bit for bit as the sharded one
    assert cli("consolidate", str(files)).returncode == 0
    monotile.resume(files, quiet=True)
    for name, t in weights(one).items():
        assert torch.equal(weights(files)[name], t), name


def test_a_save_that_fails_on_a_full_disk_leaves_the_last_checkpoint(stopped, single,
                                                                     tmp_path):
    """The file size limit (RLIMIT_FSIZE, inherited by both processes) refuses each process's
    shard file of step 6 (~180 kB) as a full disk would: the error is one line, the run is
    still at step 3, and it resumes on two processes once there is room."""
    run = copy(stopped, tmp_path / "run")
    before = (run / "trainer_state.json").read_text()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (120_000, 120_000))

    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", "-m", "monotile", "resume", str(run),
                           "--quiet"], capture_output=True, text=True, timeout=300, env=env,
                          preexec_fn=limit)
    assert done.returncode != 0
    assert "error: cannot write checkpoint-6" in done.stderr, done.stderr[-3000:]
    assert "File too large" in done.stderr
    assert (run / "trainer_state.json").read_text() == before
    assert not (run / "checkpoint-6").exists()
    assert shard_files(run / "checkpoint-3")
    # (torchrun may stop the main process before it removed the journal: resume drops it)

    done = torchrun("resume", str(run), "--quiet")  # the run's own strategy: fsdp
    assert done.returncode == 0, done.stderr[-3000:]
    assert state_of(run)["checkpoint"] == "checkpoint-6" and not (run / JOURNAL).exists()
    assert_same_model(run, single)


# ---- below the run: the save itself ----------------------------------------------------------

SAVER = r"""
import sys, torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from monotile.train.checkpoint import save_checkpoint
run = sys.argv[1]
dist.init_process_group("gloo", init_method=f"file://{sys.argv[2]}", rank=0, world_size=1)
torch.manual_seed(0)
model = torch.nn.Linear(1024, 2048)
fully_shard(model)  # one process: the parameters are DTensors, saved as shards
opt = torch.optim.AdamW(model.parameters())
model(torch.randn(2, 1024)).sum().backward(); opt.step()
step = 0
while True:
    step += 1
    with torch.no_grad():
        model.weight.to_local().fill_(step)
    save_checkpoint(run, model, opt, {"step": step})
    print(step, flush=True)
"""


def test_kill_during_sharded_saves_leaves_a_whole_checkpoint(tmp_path):
    from monotile.train.checkpoint import load_optimizer_state, load_sharded_model, recover
    run = tmp_path / "run"
    run.mkdir()
    for i, delay in enumerate((0.2, 0.35, 0.5, 0.65, 0.8, 0.95)):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run),
                                 str(tmp_path / f"pg{i}")], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint is committed
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover(run)
        assert not (run / JOURNAL).exists()
        step = state_of(run)["step"]
        assert [p.name for p in run.iterdir() if p.is_dir()] == [f"checkpoint-{step}"]
        model = torch.nn.Linear(1024, 2048)
        load_sharded_model(model, run)
        assert model.weight.eq(step).all()  # the folder and trainer_state.json agree
        opt = torch.optim.AdamW(model.parameters())
        load_optimizer_state(model, opt, run, state_of(run))
        assert opt.state[model.weight]["exp_avg"].abs().sum() > 0


PROBE = r"""
import sys, torch, torch.nn.functional as F
from monotile.core.transformer import ModelConfig, init_weights
from monotile.modalities.text import LanguageModel
from monotile.train import distributed
from monotile.train.checkpoint import (model_tensors, optimizer_tensors, save_checkpoint,
                                       save_tensors)
from monotile.train.optim import make_optimizer
out = sys.argv[1]
ctx = distributed.setup("fsdp")
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=51, n_layer=3, n_head=2, d_model=32, context=16, bias=True)
model = LanguageModel(cfg)  # 51 rows: shards of 26 and 25
init_weights(model, cfg.n_layer)
distributed.wrap(model, ctx)
opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99)
x = torch.randint(0, 51, (2, 16), generator=torch.Generator().manual_seed(ctx.rank))
F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
opt.step()
save_checkpoint(out, model, opt, {"step": 1})
w = model_tensors(model)  # today's gather, for the comparison
o, meta = optimizer_tensors(opt)
if ctx.main:
    save_tensors(f"{out}/gathered_model.safetensors", w)
    save_tensors(f"{out}/gathered_optimizer.safetensors", o)
distributed.shutdown()
"""


def test_one_process_reads_the_shards_into_what_a_gathered_save_holds(tmp_path):
    """Uneven shards (51 rows over 2 processes), read back whole in one process: the same
    tensors, bit for bit, as gathering them (the format before sharded checkpoints)."""
    from monotile.core.transformer import ModelConfig
    from monotile.modalities.text import LanguageModel
    from monotile.train.checkpoint import (load_optimizer_state, load_sharded_model,
                                           model_tensors, optimizer_tensors)
    from monotile.train.optim import make_optimizer
    out = tmp_path / "ckpt"
    out.mkdir()
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc-per-node=2", str(probe), str(out)], capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert shard_files(out / "checkpoint-1") == [
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors"]
    cfg = ModelConfig(vocab_size=51, n_layer=3, n_head=2, d_model=32, context=16, bias=True)
    model = LanguageModel(cfg)
    load_sharded_model(model, out)
    gathered = load_file(str(out / "gathered_model.safetensors"))
    mine = model_tensors(model)
    assert sorted(mine) == sorted(gathered)
    for name, t in gathered.items():
        assert torch.equal(mine[name], t), name
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99)
    load_optimizer_state(model, opt, out, state_of(out))
    gathered = load_file(str(out / "gathered_optimizer.safetensors"))
    mine, _ = optimizer_tensors(opt)
    assert sorted(mine) == sorted(gathered)
    for name, t in gathered.items():
        assert torch.equal(mine[name], t), name


def test_a_lost_shard_file_is_named_not_read_as_zeros(fsdp_run, tmp_path):
    run = copy(fsdp_run, tmp_path / "run")
    (run / "checkpoint-6" / "shard-00001-model-00001-of-00001.safetensors").unlink()
    done = cli("generate", str(run), "--prompt", "A")
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "checkpoint-6" in done.stderr and "is not whole in the shard files" in \
        done.stderr
