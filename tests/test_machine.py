"""The device and threads are this machine's, not the run's: a run trained on a GPU loads, is
used and resumes on a CPU-only machine unchanged, and every verb that loads a run takes
--device and --threads."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import monotile

from conftest import TINY, cli, set_args

VERBS_THAT_LOAD = ("eval", "generate", "chat", "predict", "embed", "search", "explain",
                   "serve", "resume", "finetune", "train")


def trained_on_cuda(run_dir, dest):
    """A copy of a run whose config.json says it trained on a GPU."""
    shutil.copytree(run_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["train"]["device"] = "cuda"
    (dest / "config.json").write_text(json.dumps(config))
    return dest


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_run_trained_on_a_gpu_is_used_on_this_cpu_as_it_is(tiny_run, tmp_path):
    run_dir = trained_on_cuda(tiny_run.dir, tmp_path / "gpu-run")
    before = (run_dir / "config.json").read_text()
    assert next(monotile.load(run_dir).model.parameters()).device.type == "cpu"
    expected = tiny_run.generate("ROMEO:", max_new_tokens=12, temperature=0.0)
    done = cli("generate", str(run_dir), "--prompt", "ROMEO:", "--max-new-tokens", "12",
               "--temperature", "0", "--threads", "1", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["text"] == expected
    assert cli("eval", str(run_dir), "--json", "--device", "cpu").returncode == 0
    asked = cli("generate", str(run_dir), "--prompt", "x", "--device", "cuda")
    assert asked.returncode == 2
    assert asked.stderr.strip().endswith("use --device cpu (or --device auto)")
    no_mps = cli("generate", str(run_dir), "--prompt", "x", "--device", "mps")
    assert no_mps.returncode == 2 and "has no Apple GPU (MPS)" in no_mps.stderr
    assert (run_dir / "config.json").read_text() == before  # the run is left as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_gpu_run_stopped_midway_resumes_on_this_cpu(small_text, tmp_path):
    out = tmp_path / "stopped"
    done = cli("train", "text", "--preset", "shakespeare-char", "--out", str(out), "--data",
               str(small_text), *set_args(dict(TINY, max_steps="20")), "--stop-at", "10",
               "--quiet")
    assert done.returncode == 0, done.stderr
    run_dir = trained_on_cuda(out, tmp_path / "gpu-run")
    done = cli("resume", str(run_dir), "--device", "cpu", "--threads", "2", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 20


@pytest.mark.parametrize("verb", VERBS_THAT_LOAD)
def test_every_verb_that_loads_a_run_takes_device_and_threads(verb):
    shown = cli(verb, "--help")
    assert "--device" in shown.stdout and "--threads" in shown.stdout, shown.stdout


@pytest.mark.parametrize("flag, value, message", [
    ("--device", "gpu0", "'gpu0' is not a device: give auto, cpu, cuda, cuda:N or mps"),
    ("--threads", "0", "'0' is not a thread count"),
    ("--threads", "two", "'two' is not a thread count")])
def test_a_bad_device_or_thread_count_is_one_line_and_exit_2(tiny_run, flag, value, message):
    done = cli("generate", str(tiny_run.dir), "--prompt", "x", flag, value)
    assert done.returncode == 2 and message in done.stderr
