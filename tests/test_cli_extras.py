"""What users of a command-line tool expect besides its verbs: --version, shell completion,
and a run's config.json as the start of a new run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cli


def test_version_names_monotile_torch_and_python():
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("monotile 0.") and "torch 2." in done.stdout


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completion_completes_verbs_flags_and_choices():
    script = cli("completion", "bash")
    assert script.returncode == 0
    probe = """
    source /dev/stdin
    complete_words() { COMP_WORDS=("$@"); COMP_CWORD=$(($# - 1)); _shtab_monotile
                       echo "${COMPREPLY[*]}"; }
    complete_words monotile tr
    complete_words monotile generate --dt
    complete_words monotile generate --dtype ""
    """
    done = subprocess.run(["bash", "-c", probe], input=script.stdout, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.splitlines() == ["train", "--dtype", "float32 bfloat16 int8 int4"], \
        done.stderr
    zsh = cli("completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef monotile")
    assert cli("completion", "fish").returncode == 2


def test_a_runs_config_starts_a_new_run_with_changes(tiny_run, tmp_path):
    source = tiny_run.dir / "config.json"
    out = tmp_path / "again"
    done = cli("train", "--config", str(source), "--set", "max_steps=6", "eval_interval=6",
               "--out", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 6
    old, new = json.loads(source.read_text()), json.loads((out / "config.json").read_text())
    assert new["task"] == old["task"] == "text" and new["model"] == old["model"]
    assert new["train"] == {**old["train"], "max_steps": 6, "eval_interval": 6}
    assert new["text"] == old["text"]  # the same data, read and tokenized again
    folder = cli("train", "text", "--config", str(tiny_run.dir), "--set", "max_steps=2",
                 "--out", str(tmp_path / "from-folder"), "--quiet")
    assert folder.returncode == 0, folder.stderr


@pytest.mark.parametrize("args, message", [
    (["--config", "{run}", "--preset", "shakespeare-char"], "give --preset or --config, not both"),
    (["vision", "--config", "{run}"], "is the config of a text run, not vision"),
    (["--config", "{missing}"], "no such file; give a run's config.json or its folder"),
    (["--config", "{notjson}"], "is not JSON"),
    ([], "give the task to train")])
def test_a_bad_config_is_one_line_and_exit_2(tiny_run, tmp_path, args, message):
    (tmp_path / "bad.json").write_text("{oops")
    paths = {"run": str(tiny_run.dir), "missing": str(tmp_path / "nope.json"),
             "notjson": str(tmp_path / "bad.json")}
    done = cli("train", *[a.format(**paths) for a in args], "--out", str(tmp_path / "x"))
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not (tmp_path / "x").exists()


def test_set_given_twice_keeps_both_overrides():
    """`--set a=1 --set b=2` is how scripts pass settings one by one; the second must not
    replace the first (argparse's plain store did, and a 20-step trial trained 1500 steps)."""
    from monotile.cli import parser
    for argv in (["train", "series"], ["finetune", "RUN", "--data", "x.txt"], ["scaling"]):
        args = parser().parse_args(argv + ["--set", "max_steps=20", "--set",
                                           "eval_interval=20", "lr=1e-3"])
        assert args.overrides == ["max_steps=20", "eval_interval=20", "lr=1e-3"], argv


APART = """
import os, threading
from monotile.cli.common import apart
from monotile.errors import ConfigError
held = []
def work():  # 64 MB written in the child, kept there
    held.append(bytearray(b"x" * (64 << 20)))
    return os.getpid(), len(held)
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20
before = rss()
pid, n = apart(work)
assert pid != os.getpid() and n == 1 and held == [], (pid, n, len(held))
assert rss() < before + 16, (before, rss())  # the child's memory left with it
try:
    apart(lambda: (_ for _ in ()).throw(ConfigError("bad value; fix it")))
except ConfigError as e:  # raised again here, as it was there
    assert str(e) == "bad value; fix it"
else:
    raise AssertionError("no error")
stop = threading.Event()
threading.Thread(target=stop.wait).start()  # another Python thread: the work runs here
assert apart(os.getpid) == os.getpid()
stop.set()
print("ok")
"""


@pytest.mark.skipif(not hasattr(os, "fork") or not Path("/proc/self/statm").exists(),
                    reason="fork and /proc (Linux)")
def test_apart_runs_the_work_in_a_child_and_gives_back_its_result_or_error():
    # a fresh interpreter: pytest's own threads (xdist's) would keep the work here
    done = subprocess.run([sys.executable, "-c", APART], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and done.stdout == "ok\n", done.stderr
