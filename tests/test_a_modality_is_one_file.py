"""A modality is one file: a toy one, defined here and nowhere else, is trained, evaluated,
resumed, used for prediction, explained, budgeted and served through the public paths (the
`monotile` command and HTTP), and the built-in ones meet the Task contract as code.

The toy task counts: its input is a sequence of bits, its answer how many of them are 1. The
`monotile` subprocesses import this file through $MONOTILE_MODALITIES, as a user's own
modality module would be imported.
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import monotile
from monotile.core.transformer import Transformer, init_weights
from monotile.errors import DataError
from monotile.modalities import (TASKS, Task, TaskBase, Trainable, is_trainable, members,
                                 register)

HERE = Path(__file__).resolve().parent
MODULE = Path(__file__).stem


# ---- the toy modality: everything it is, in this one section --------------------------------

@dataclass(frozen=True, kw_only=True)
class CountConfig:
    length: int = 8               # bits per sequence
    eval_size: int = 512          # held-out sequences, drawn with eval_seed
    eval_seed: int = 1234


class BitCounter(nn.Module):
    """Bit embedding -> bidirectional trunk -> mean over positions -> logits of 0..length."""

    def __init__(self, cfg, length: int):
        super().__init__()
        self.emb = nn.Embedding(2, cfg.d_model)
        self.trunk = Transformer(cfg)
        self.head = nn.Linear(cfg.d_model, length + 1)

    def forward(self, bits: torch.Tensor) -> torch.Tensor:
        return self.head(self.trunk(self.emb(bits), causal=False).mean(1))


@register
class CountTask(TaskBase):
    """How many of a sequence's bits are 1: accuracy on held-out sequences."""

    name = "bitcount"
    Config = CountConfig
    best_metric = ("accuracy", "max")
    what = "bit sequence"

    @classmethod
    def prepare(cls, config, model_cfg, data=None):
        if data is not None:
            raise DataError("the bit-count task makes its own data; leave --data out")
        return cls(config), model_cfg.replace(context=config.length, vocab_size=2)

    def build_model(self, cfg):
        model = BitCounter(cfg, self.config.length)
        init_weights(model, cfg.n_layer)
        return model

    def batches(self, split, rng, batch_size):
        while True:
            bits = torch.randint(0, 2, (batch_size, self.config.length), generator=rng)
            yield bits, bits.sum(1)

    def loss(self, model, batch):
        bits, count = batch
        return F.cross_entropy(model(bits), count)

    def tokens(self, batch):
        return batch[0].numel()

    @torch.no_grad()
    def evaluate(self, model, progress=False):
        g = torch.Generator().manual_seed(self.config.eval_seed)
        bits = torch.randint(0, 2, (self.config.eval_size, self.config.length), generator=g)
        logits = model(bits.to(next(model.parameters()).device)).cpu()
        return {"accuracy": (logits.argmax(1) == bits.sum(1)).float().mean().item(),
                "loss": F.cross_entropy(logits, bits.sum(1)).item()}

    def read(self, source):
        """"0110...", a file holding it, or a JSON list of bits."""
        if isinstance(source, (str, Path)) and Path(source).is_file():
            source = Path(source).read_text().strip()
        bits = [int(c) for c in source] if isinstance(source, str) else source
        if not (isinstance(bits, list) and len(bits) == self.config.length
                and all(b in (0, 1) for b in bits)):
            raise DataError(f"give {self.config.length} bits, e.g. {'01' * 4}")
        return torch.tensor(bits)

    @torch.no_grad()
    def predict(self, model, items, *, progress=False):
        probs = model(torch.stack(items)).softmax(-1)
        return [{"count": int(p.argmax()), "probability": float(p.max())} for p in probs]

    def example_inputs(self, model_cfg, batch, length):
        return (torch.randint(0, 2, (batch, self.config.length)),), self.config.length

    def attention_inputs(self, item):
        return (item[None],)


# ---- the contract ---------------------------------------------------------------------------

def test_every_registered_task_meets_the_task_contract():
    assert {"text", "vision", "speech", "series", "transcribe", "bitcount"} <= set(TASKS)
    for name, cls in TASKS.items():
        assert cls.name == name
        for member in members(Task, of_class=True):
            assert hasattr(cls, member), (name, member)
        for method in ("load", "save", "build_model", "read", "predict", "evaluate"):
            wanted = list(inspect.signature(getattr(Task, method)).parameters)[1:]
            got = inspect.signature(getattr(cls, method)).parameters
            assert all(p in got or p == "options" for p in wanted), (name, method)
    trainable = {n for n, cls in TASKS.items() if is_trainable(cls)}
    assert trainable == set(TASKS) - {"transcribe"}
    toy = CountTask(CountConfig())
    assert isinstance(toy, Task) and isinstance(toy, Trainable)


def test_a_task_missing_part_of_the_contract_is_refused_when_registered():
    class Half(TaskBase):
        name = "half"
        Config = CountConfig
        best_metric = ("accuracy", "max")
    with pytest.raises(TypeError, match="lacks build_model, evaluate, predict, read"):
        register(Half)
    with pytest.raises(ValueError, match="registered already"):
        register(type("Other", (CountTask,), {}))
    assert "half" not in TASKS


# ---- the toy through the public paths -------------------------------------------------------

SETTINGS = ["n_layer=2", "n_head=2", "d_model=32", "positions=learned", "batch_size=64",
            "max_steps=300", "eval_interval=150", "log_interval=50", "warmup_steps=20",
            "lr=3e-3", "min_lr=3e-4", "seed=0"]


@pytest.fixture(scope="module")
def env():
    """The environment a user with their own modality module sets up."""
    env = dict(os.environ, MONOTILE_MODALITIES=MODULE, PYTHONWARNINGS="default",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    return env


def run_cli(env, *args, timeout=600):
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-m", "monotile", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)
    return done


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory, env):
    out = tmp_path_factory.mktemp("toy") / "bitcount"
    half = run_cli(env, "train", "bitcount", "--out", str(out), "--set", *SETTINGS,
                   "--stop-at", "150", "--json")
    assert half.returncode == 0, half.stderr
    assert json.loads(half.stdout)["step"] == 150
    done = run_cli(env, "resume", str(out), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["step"] == 300
    return out


def test_the_toy_trains_resumes_and_evaluates_on_held_out_sequences(toy_run, env, tmp_path):
    figures = json.loads(run_cli(env, "eval", str(toy_run), "--json").stdout)
    assert figures["accuracy"] > 0.8, figures  # chance: 27 % (always answering 4)
    # resumed at 150, it ends with the weights of a run trained 300 steps straight
    straight = tmp_path / "straight"
    assert run_cli(env, "train", "bitcount", "--out", str(straight), "--set", *SETTINGS,
                   "--quiet").returncode == 0
    a, b = monotile.load(toy_run), monotile.load(straight)
    for (name, x), y in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(x, y), name
    text = run_cli(env, "eval", str(toy_run))
    assert text.returncode == 0 and "accuracy" in text.stdout


def test_the_toy_predicts_explains_and_budgets_on_the_command_line(toy_run, env, tmp_path):
    bits = tmp_path / "bits.txt"
    bits.write_text("11011010\n")
    done = run_cli(env, "predict", str(toy_run), str(bits), "10000001", "--json",
                   "--output", str(tmp_path / "counts.csv"))
    assert done.returncode == 0, done.stderr
    counts = [p["count"] for p in json.loads(done.stdout)["predictions"]]
    assert counts == [5, 2]
    assert (tmp_path / "counts.csv").read_text().splitlines()[0] == "input,count,probability"
    bad = run_cli(env, "predict", str(toy_run), "0110")
    assert bad.returncode == 2 and "give 8 bits" in bad.stderr
    refused = run_cli(env, "predict", str(toy_run), "01100110", "--beam", "4")
    assert refused.returncode == 2 and "--beam does not apply to bitcount runs" in refused.stderr
    shown = run_cli(env, "explain", str(toy_run), "11110000", "--out", str(tmp_path), "--json")
    assert shown.returncode == 0, shown.stderr
    result = json.loads(shown.stdout)
    a = torch.tensor(result["attention"])
    assert a.shape == (8, 8) and torch.allclose(a.sum(-1), torch.ones(8), atol=1e-5)
    assert Path(result["plot"]).stat().st_size > 1000
    budget = json.loads(run_cli(env, "explain", str(toy_run), "--budget", "--json").stdout)
    assert budget["total"]["parameters"] == monotile.load(toy_run).parameters()
    assert budget["tokens"] == 8 and budget["total"]["forward_flops"] > 0


def test_the_toy_is_served_over_http(toy_run, env, monkeypatch):
    from monotile.serve.process import start_server, stop
    for key in ("MONOTILE_MODALITIES", "PYTHONPATH"):
        monkeypatch.setenv(key, env[key])
    proc, url = start_server(f"toy={toy_run}")
    try:
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert [(c["id"], c["task"], c["routes"]) for c in cards] == [
            ("toy", "bitcount", ["predictions"])]
        answer = httpx.post(url + "/v1/predictions", json={"model": "toy",
                                                           "input": [1, 0, 1, 1, 1, 0, 0, 1]})
        assert answer.status_code == 200, answer.text
        assert answer.json()["data"]["count"] == 5
        wrong = httpx.post(url + "/v1/predictions", json={"model": "toy", "input": [1, 0]})
        assert wrong.status_code == 400 and "give 8 bits" in wrong.json()["error"]["message"]
        other = httpx.post(url + "/v1/completions", json={"model": "toy", "prompt": "hi"})
        assert other.status_code == 400 and "/v1/predictions" in other.json()["error"]["message"]
        option = httpx.post(url + "/v1/predictions", json={"model": "toy", "input": [1] * 8,
                                                            "options": {"top_k": 2}})
        assert option.status_code == 400 and option.json()["error"]["param"] == "options"
    finally:
        stop(proc)
