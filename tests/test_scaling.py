"""monotile scaling: the L(N, D) fit against a known law, and a small sweep end to end."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from monotile.scaling import fit_law, law, parse_tokens

from conftest import cli


def test_the_fit_recovers_a_known_law():
    true = dict(E=1.7, A=20.0, B=100.0, alpha=0.34, beta=0.28)
    N = np.repeat([1e5, 3e5, 1e6], 3)
    D = np.tile([1e6, 2e6, 4e6], 3)
    fit = fit_law(N, D, law(N, D, **true))  # L = E + A / N^alpha + B / D^beta, by hand
    for name, value in true.items():
        assert fit[name] == pytest.approx(value, rel=0.03), name
    # a model 3x larger on 2x the data: extrapolated within 0.1 %
    assert law(3e6, 8e6, **{k: fit[k] for k in true}) == pytest.approx(law(3e6, 8e6, **true),
                                                                       rel=1e-3)
    assert parse_tokens("2M") == 2_000_000 and parse_tokens("500k") == 500_000


def test_a_sweep_fits_predicts_measures_and_reuses_its_runs(small_text, tmp_path):
    args = ["scaling", "--preset", "shakespeare-char", "--data", str(small_text), "--sizes",
            "16,32", "--tokens", "4k,8k", "--predict", "48", "--out", str(tmp_path), "--set",
            "n_layer=1", "n_head=2", "context=32", "batch_size=8", "eval_tokens=2000",
            "--json"]
    done = cli(*args)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout)
    assert len(r["runs"]) == 4 and {row["d_model"] for row in r["runs"]} == {16, 32}
    assert all(row["D"] in (4096, 7936) for row in r["runs"])  # whole steps of 8 x 32 tokens
    bigger = [row for row in r["runs"] if row["d_model"] == 32]
    smaller = [row for row in r["runs"] if row["d_model"] == 16]
    assert bigger[0]["N"] > smaller[0]["N"]
    p = r["prediction"]
    assert p["d_model"] == 48 and p["predicted"] > 0 and p["measured"] > 0
    assert p["error"] == pytest.approx((p["predicted"] - p["measured"]) / p["measured"])
    assert (tmp_path / "scaling.png").stat().st_size > 1000
    start = time.perf_counter()
    again = json.loads(cli(*args).stdout)  # every run is reused: only the fit is redone
    assert again["runs"] == r["runs"] and time.perf_counter() - start < 60
    for bad, message in ((["--sizes", "15,32"], "size 15 is invalid"),
                         (["--tokens", "lots"], "not a number of tokens"),
                         (["--preset", "digits"], "not one"),
                         (["--sizes", "32"], "at least 2 sizes")):
        done = cli("scaling", "--out", str(tmp_path / "bad"), *bad)
        assert done.returncode == 2 and message in done.stderr, (bad, done.stderr)
