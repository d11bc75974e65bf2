"""What a hostile but fair tester did to run directories, and what must hold since: readers
never change a run (one writer, under RUN/.lock), a run stopped in its first second resumes,
a full disk, damaged files and absurd values are one line and exit 2, Ctrl-C exits 130.

The bad-input cases are a table (CASES): how to damage a copy of a trained run, the command,
the exit status and a fragment of the one-line message."""

import json
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import monotile
from monotile.errors import CheckpointError, ConfigError

from conftest import TINY, cli, set_args

STEPS = dict(TINY, max_steps="24", eval_interval="12", checkpoint_interval="4",
             log_interval="4")


def weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "model.safetensors"))


def assert_bit_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def train_args(small_text, out, **over) -> list[str]:
    return ["train", "text", "--preset", "shakespeare-char", "--data", str(small_text),
            "--quiet", "--out", str(out), *set_args(dict(STEPS, **over))]


# ---- one writer, readers that change nothing -------------------------------------------------

def test_loading_a_run_in_a_loop_while_it_trains_leaves_the_training_exact(tmp_path, small_text):
    """A training run that checkpoints every step, loaded 200 times by another process while
    it trains (as `eval RUN` in a loop did), finishes with the weights of an undisturbed run."""
    over = dict(max_steps="300", eval_interval="300", checkpoint_interval="1",
                log_interval="50")
    assert cli(*train_args(small_text, tmp_path / "undisturbed", **over)).returncode == 0
    trainer = subprocess.Popen([sys.executable, "-m", "monotile",
                                *train_args(small_text, tmp_path / "run", **over)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    loads, deadline = 0, time.monotonic() + 600
    while (loads < 200 or trainer.poll() is None) and time.monotonic() < deadline:
        try:
            run = monotile.load(tmp_path / "run")
        except CheckpointError as e:  # only before the run exists as a whole
            assert "is not a monotile run" in str(e) or "does not exist" in str(e) or \
                "no checkpoint yet" in str(e), e
            time.sleep(0.01)
            continue
        assert run.model is not None
        loads += 1
    _, err = trainer.communicate(timeout=600)
    assert trainer.returncode == 0, err
    assert loads >= 200
    assert_bit_identical(weights(tmp_path / "undisturbed"), weights(tmp_path / "run"))


def test_a_second_writer_is_refused_by_name_and_the_first_goes_on(tmp_path, small_text):
    trainer = subprocess.Popen([sys.executable, "-m", "monotile", *train_args(
        small_text, tmp_path / "run", max_steps="100000", eval_interval="100000",
        checkpoint_interval="100000")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "trainer_state.json").exists():
            assert time.monotonic() < deadline and trainer.poll() is None
            time.sleep(0.05)
        second = cli("resume", str(tmp_path / "run"))
        assert second.returncode == 2
        assert "is being trained by another process (pid" in second.stderr
        assert "Traceback" not in second.stderr
        again = cli(*train_args(small_text, tmp_path / "run"))  # train --out onto it
        assert again.returncode == 2 and "already holds a run" in again.stderr
        assert trainer.poll() is None  # the first writer was not disturbed
        reader = cli("generate", str(tmp_path / "run"), "--prompt", "A",
                     "--max-new-tokens", "5", "--seed", "0")  # readers are never refused
        assert reader.returncode == 0, reader.stderr
        figures = cli("eval", str(tmp_path / "run"), "--json")  # and told what they read
        assert figures.returncode == 0, figures.stderr
        assert json.loads(figures.stdout)["training"]["pid"] == str(trainer.pid)
        said = cli("eval", str(tmp_path / "run"))
        assert f"is training now (pid {trainer.pid})" in said.stderr
    finally:
        trainer.send_signal(signal.SIGINT)
        out, err = trainer.communicate(timeout=120)
    assert trainer.returncode == 130, err  # Ctrl-C: the shells' status
    assert "(Ctrl-C), checkpointed; continue with: monotile resume" in out


def test_a_run_stopped_before_its_first_checkpoint_resumes_from_step_0(tmp_path, small_text):
    """What a kill in a run's first second leaves (config.json and the tokenizer, no
    checkpoint) is resumed from step 0, to the weights of an undisturbed run."""
    straight = tmp_path / "straight"
    assert cli(*train_args(small_text, straight)).returncode == 0
    early = tmp_path / "early"
    early.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (early / name).write_bytes((straight / name).read_bytes())
    (early / "metrics.jsonl").write_text('{"step": 4, "loss": 9.0}\n{"step": 8, "lo')
    loaded = cli("eval", str(early))
    assert loaded.returncode == 2 and "stopped before the first one" in loaded.stderr
    assert "monotile resume" in loaded.stderr
    retrain = cli(*train_args(small_text, early))
    assert retrain.returncode == 2 and "monotile resume" in retrain.stderr
    done = cli("resume", str(early), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 24
    assert_bit_identical(weights(straight), weights(early))
    steps = [json.loads(line)["step"] for line in
             (early / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and 4 in steps  # the stopped start's lines are gone


def test_killed_as_soon_as_its_folder_appears_a_run_still_resumes_exactly(tmp_path, small_text):
    straight = tmp_path / "straight"
    assert cli(*train_args(small_text, straight)).returncode == 0
    for attempt in range(3):
        out = tmp_path / f"killed{attempt}"
        proc = subprocess.Popen([sys.executable, "-m", "monotile",
                                 *train_args(small_text, out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None and not out.exists():
            time.sleep(0.001)
        proc.kill()
        proc.wait()
        if not (out / "config.json").exists():  # killed before it was a run: train again
            assert cli(*train_args(small_text, out)).returncode == 0
        else:
            resumed = cli("resume", str(out))
            assert resumed.returncode == 0, resumed.stderr
        assert_bit_identical(weights(straight), weights(out))


def test_a_model_too_large_for_the_machine_leaves_nothing_behind(tmp_path, small_text):
    out = tmp_path / "huge"
    done = cli(*train_args(small_text, out, d_model="200000"))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "more than the" in done.stderr and "lower d_model" in done.stderr
    assert not out.exists()


# ---- the disk fills up -----------------------------------------------------------------------

def test_a_full_disk_is_one_line_and_the_last_checkpoint_stays(tmp_path, small_text):
    """The file size limit (RLIMIT_FSIZE) makes the kernel refuse writes past 150 kB, as a
    full disk refuses them: the checkpoint's optimizer file (217 kB) cannot be written."""
    run = tmp_path / "run"
    assert cli(*train_args(small_text, run)).returncode == 0
    doc = json.loads((run / "config.json").read_text())
    doc["train"]["max_steps"] = 48
    (run / "config.json").write_text(json.dumps(doc))
    before = weights(run)
    state = (run / "trainer_state.json").read_text()

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    done = subprocess.run([sys.executable, "-m", "monotile", "resume", str(run)],
                          capture_output=True, text=True, preexec_fn=limit, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]  # after the progress bar, on a line of its own
    assert line.startswith("error: cannot write ") and str(run) in line, done.stderr
    assert "File too large" in line and "MB" in line
    assert (run / "trainer_state.json").read_text() == state
    assert_bit_identical(before, weights(run))
    assert not (run / ".checkpoint.tmp").exists()
    assert cli("resume", str(run)).returncode == 0  # room again: it goes on


# ---- damaged files and absurd values: one line, exit 2 ----------------------------------------

def _edit_json(name, change):
    def damage(run: Path):
        path = run / name
        doc = json.loads(path.read_text())
        change(doc)
        path.write_text(json.dumps(doc))
    return damage


def _more_steps(doc):
    doc["train"]["max_steps"] = 80


def _write(name, text):
    return lambda run: (run / name).write_text(text)


def _folder_config(run: Path):
    (run / "config.json").unlink()
    (run / "config.json").mkdir()


def _nan_weights(run: Path):
    tensors = weights(run)
    first = next(iter(tensors))
    tensors[first][:] = float("nan")
    save_file(tensors, str(run / "model.safetensors"), metadata={"format": "pt"})


def _state(change):
    def both(run: Path):
        _edit_json("config.json", _more_steps)(run)
        _edit_json("trainer_state.json", change)(run)
    return both


CASES = [  # (id, damage, command after RUN, exit status, fragment of the message)
    ("state-step-text", _state(lambda d: d.update(step="x")), ["resume"], 2,
     "trainer_state.json is damaged (step is 'x')"),
    ("state-rng", _state(lambda d: d.update(torch_rng="AAAA")), ["resume"], 2,
     "trainer_state.json is damaged"),
    ("state-list", lambda run: (_more_steps_file(run), _write("trainer_state.json", "[]")(run)),
     ["resume"], 2, "trainer_state.json is damaged (not a JSON object)"),
    ("config-null", _write("config.json", "null"), ["eval"], 2, "not a run's settings"),
    ("config-list", _write("config.json", "[1, 2]"), ["eval"], 2, "not a run's settings"),
    ("config-folder", _folder_config, ["eval"], 2, "is a folder, not a file"),
    ("config-huge-d_model", _edit_json("config.json", lambda d: d["model"].update(
        d_model=200000)), ["eval"], 2, "more than the"),
    ("config-huge-context", _edit_json("config.json", lambda d: d["model"].update(
        context=10**9)), ["generate", "--prompt", "A"], 2, "more than the"),
    ("config-fractional-steps", _edit_json("config.json", lambda d: d["train"].update(
        max_steps=210.5)), ["resume"], 2, "max_steps=210.5 is invalid: expected int"),
    ("config-section-text", _edit_json("config.json", lambda d: d.update(train="fast")),
     ["eval"], 2, "config section 'train' is str"),
    ("nan-weights", _nan_weights, ["generate", "--prompt", "A", "--max-new-tokens", "3"], 2,
     "the model's output is NaN"),
    ("prompt-not-utf8", None, ["generate", "--prompt", "A\udcffB"], 2,
     "not UTF-8: b'\\xff' at character 1"),
    ("seed-too-large", None, ["generate", "--prompt", "A", "--seed", "9" * 20], 2,
     "seed=99999999999999999999 is invalid"),
    ("temperature-nan", None, ["generate", "--prompt", "A", "--temperature", "nan"], 2,
     "temperature=nan is invalid"),
    ("negative-tokens", None, ["generate", "--prompt", "A", "--max-new-tokens", "-3"], 2,
     "--max-new-tokens -3 is invalid"),
]


def _more_steps_file(run: Path):
    _edit_json("config.json", _more_steps)(run)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_text) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "run"
    assert cli(*train_args(small_text, out)).returncode == 0
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, trained, tmp_path):
    name, damage, command, status, fragment = case
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    if damage is not None:
        damage(run)
    done = cli(command[0], str(run), *command[1:])
    assert done.returncode == status, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in done.stderr and len(lines) == 1, done.stderr
    assert fragment in lines[0], lines[0]


def test_text_data_that_is_a_folder_is_one_line(tmp_path, small_text):
    done = cli(*train_args(tmp_path, tmp_path / "run"))
    assert done.returncode == 2 and "is a folder; a text run reads one" in done.stderr
    assert not (tmp_path / "run").exists()


def test_generate_on_a_vision_run_says_which_command_it_takes(tmp_path):
    run = monotile.train("vision", "digits", out=tmp_path / "digits", quiet=True,
                         overrides=dict(max_steps="2", eval_interval="2", batch_size="8"))
    done = cli("generate", str(run.dir), "--prompt", "A")
    assert done.returncode == 2 and "does not generate text" in done.stderr
    assert "monotile predict" in done.stderr


def test_fractional_and_non_finite_settings_are_refused(small_text, tmp_path):
    for over in ({"max_steps": 210.5}, {"max_steps": True}, {"weight_decay": float("nan")},
                 {"lr": "inf"}):
        with pytest.raises(ConfigError, match="is invalid"):
            monotile.train("text", "shakespeare-char", data=small_text, out=tmp_path / "x",
                           overrides=dict(TINY, **over), quiet=True)
    assert not (tmp_path / "x").exists()


def test_a_torn_metrics_line_neither_blocks_resume_nor_survives_it(trained, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    _more_steps_file(run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 19')  # a kill during the line's write
    done = cli("resume", str(run), "--json")
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 80


def test_huge_max_new_tokens_is_capped_at_the_context_and_said(trained):
    done = cli("generate", str(trained), "--prompt", "A", "--max-new-tokens", "1000000000",
               "--seed", "0", "--json", timeout=120)
    assert done.returncode == 0, done.stderr
    assert "more than the model's context (32 tokens); generating 32" in done.stderr
    assert json.loads(done.stdout)["new_tokens"] <= 32


def test_eval_json_is_strict_json(trained):
    from monotile.cli.common import finite
    assert finite({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"}) == {
        "a": None, "b": [1.0, None], "c": "x"}
    done = cli("eval", str(trained), "--json")
    json.loads(done.stdout, parse_constant=lambda c: pytest.fail(f"bare {c} in --json"))


def test_resuming_on_another_thread_count_warns_how_to_resume_exactly(trained, tmp_path):
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    _more_steps_file(run)
    state = json.loads((run / "trainer_state.json").read_text())
    assert state["threads"] == torch.get_num_threads()
    other = 1 if state["threads"] != 1 else 2
    done = cli("resume", str(run), "--threads", str(other))
    assert done.returncode == 0, done.stderr
    assert f"trained on {state['threads']} CPU threads and resumes on {other}" in done.stderr
    assert f"--threads {state['threads']}" in done.stderr


def test_readers_do_not_write_into_the_run(trained, tmp_path):
    """A reader that met a checkpoint journal (a writer mid-commit) leaves it alone."""
    run = tmp_path / "run"
    subprocess.run(["cp", "-r", str(trained), str(run)], check=True)
    journal = run / ".checkpoint.tmp"
    journal.mkdir()
    (journal / "model.safetensors").write_bytes(b"half")
    before = sorted(p.name for p in run.iterdir())
    assert monotile.load(run).generate("A", max_new_tokens=3, seed=0)
    assert sorted(p.name for p in run.iterdir()) == before
    assert (journal / "model.safetensors").read_bytes() == b"half"
    _more_steps_file(run)
    assert monotile.resume(run, quiet=True).state["step"] == 80  # the writer repairs
    assert not journal.exists()
