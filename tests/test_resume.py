"""Resuming is exact, and a crash never leaves a run without a loadable checkpoint."""

import json
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from safetensors.torch import load_file

import monotile
from monotile.errors import CheckpointError
from monotile.train.checkpoint import JOURNAL

from conftest import TINY, cli, kill_9_at_step, set_args

STEPS = dict(TINY, max_steps="24", eval_interval="12", checkpoint_interval="4",
             log_interval="4")


def weights(run_dir):
    return load_file(str(run_dir / "model.safetensors"))


def assert_bit_identical(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.mark.parametrize("stop_at", [12, 0])
def test_stop_at_n_and_resume_to_2n_equals_training_2n_straight(tmp_path, small_text, stop_at):
    straight = monotile.train("text", "shakespeare-char", out=tmp_path / "straight",
                              data=small_text, overrides=STEPS, quiet=True)
    half = monotile.train("text", "shakespeare-char", out=tmp_path / "half", data=small_text,
                          overrides=STEPS, quiet=True, until_step=stop_at)
    assert half.state["step"] == stop_at
    resumed = monotile.resume(tmp_path / "half", quiet=True)
    assert resumed.state["step"] == 24
    assert_bit_identical(weights(tmp_path / "straight"), weights(tmp_path / "half"))
    assert_bit_identical(load_file(str(tmp_path / "straight" / "optimizer.safetensors")),
                         load_file(str(tmp_path / "half" / "optimizer.safetensors")))
    assert straight.state["last_eval"] == resumed.state["last_eval"]
    steps = [json.loads(line)["step"] for line in
             (tmp_path / "half" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps)  # no step logged twice
    again = cli("resume", str(tmp_path / "half"))
    assert again.returncode == 0 and "already finished at step 24" in again.stdout


def test_kill_9_mid_training_then_resume_equals_straight_run(tmp_path, small_text):
    args = ["train", "text", "--preset", "shakespeare-char", "--data", str(small_text),
            "--quiet", *set_args(dict(STEPS, max_steps="400", eval_interval="400"))]
    assert cli(*args, "--out", str(tmp_path / "straight")).returncode == 0
    stopped_at = kill_9_at_step(args, tmp_path / "killed", 40)
    assert 40 <= stopped_at < 400
    result = cli("resume", str(tmp_path / "killed"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["step"] == 400
    assert_bit_identical(weights(tmp_path / "straight"), weights(tmp_path / "killed"))


def test_ctrl_c_stops_on_a_whole_step_and_resumes(tmp_path, small_text):
    args = ["train", "text", "--preset", "shakespeare-char", "--data", str(small_text),
            "--quiet", "--out", str(tmp_path / "run"),
            *set_args(dict(STEPS, max_steps="5000", checkpoint_interval="5000"))]
    proc = subprocess.Popen([sys.executable, "-m", "monotile", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err  # as shells expect of Ctrl-C
    assert "monotile resume" in out
    step = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["step"]
    assert 0 < step < 5000
    assert monotile.load(tmp_path / "run").generate("A", max_new_tokens=5, seed=0)


SAVER = textwrap.dedent("""
    import sys, torch
    from monotile.train.checkpoint import save_checkpoint
    run = sys.argv[1]
    model = torch.nn.Linear(1024, 2048)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 1024)).sum().backward(); opt.step()
    step = 0
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(step)
        save_checkpoint(run, model, opt, {"step": step})
        print(step, flush=True)
""")


def test_kill_during_checkpoint_writes_leaves_a_loadable_checkpoint(tmp_path):
    from monotile.train.checkpoint import load_model_weights, recover
    run = tmp_path / "run"
    run.mkdir()
    for delay in (0.3, 0.45, 0.6, 0.75, 0.9, 1.05):
        proc = subprocess.Popen([sys.executable, "-c", SAVER, str(run)],
                                stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()  # at least one checkpoint is complete
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover(run)
        assert not (run / JOURNAL).exists()
        model = torch.nn.Linear(1024, 2048)
        meta = load_model_weights(model, run / "model.safetensors")
        state = json.loads((run / "trainer_state.json").read_text())
        opt_meta = load_file(str(run / "optimizer.safetensors"))
        assert opt_meta  # readable
        step = state["step"]
        assert meta["step"] == str(step)  # the three files belong to one checkpoint
        assert model.weight.eq(step).all()


def test_truncated_checkpoint_is_refused_with_one_clear_line(tiny_run, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.dir, run)
    data = (run / "model.safetensors").read_bytes()
    (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        monotile.load(run)
    result = cli("eval", str(run))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert (run / "config.json").exists()  # nothing removed


def test_corrupt_config_is_refused_and_kept(tiny_run, tmp_path):
    import shutil
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.dir, run)
    (run / "config.json").write_text('{"task": "text", "model": {"n_layer": ')
    result = cli("generate", str(run), "--prompt", "A")
    assert result.returncode == 2 and "config.json is corrupt" in result.stderr
    assert (run / "config.json").read_text().startswith('{"task"')


def test_foreign_checkpoint_names_the_missing_tensor(tiny_run, tmp_path):
    import shutil
    from safetensors.torch import save_file
    run = tmp_path / "copy"
    shutil.copytree(tiny_run.dir, run)
    save_file({"transformer.h.0.attn.c_attn.weight": torch.zeros(3, 3)},
              str(run / "model.safetensors"))
    with pytest.raises(CheckpointError, match="tensor 'tok_emb.weight' is missing"):
        monotile.load(run)


def test_not_a_run_directory_is_refused(tmp_path):
    result = cli("generate", str(tmp_path), "--prompt", "hi")
    assert result.returncode == 2
    assert "is not a monotile run" in result.stderr


def test_pickle_is_nowhere_in_the_package():
    import pathlib
    root = pathlib.Path(monotile.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, path


def test_the_loss_plot_is_drawn_at_every_evaluation_while_training_goes_on(tmp_path,
                                                                             small_text):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "monotile", "train", "text", "--preset",
                             "shakespeare-char", "--data", str(small_text), "--quiet", "--out",
                             str(run_dir), *set_args(dict(STEPS, max_steps="100000",
                                                          eval_interval="10",
                                                          checkpoint_interval="1000"))],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    plot, metrics = run_dir / "plots" / "loss.png", run_dir / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not plot.exists():
            time.sleep(0.05)
        assert plot.exists() and proc.poll() is None  # drawn while the run goes on
        first = plot.stat().st_mtime_ns
        evals = lambda: sum('"eval"' in line for line in metrics.read_text().splitlines())
        seen = evals()
        while time.time() < deadline and evals() < seen + 2:
            time.sleep(0.05)
        time.sleep(0.5)
        assert plot.stat().st_mtime_ns > first and proc.poll() is None  # and drawn again
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    from PIL import Image
    assert Image.open(plot).size[0] > 300  # a whole PNG, never a half-written one
