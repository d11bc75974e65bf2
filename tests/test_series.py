"""Forecasting: RevIN, patches, the pinball loss, the ETTh1 protocol, and a model that learns."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import monotile
from monotile.modalities.series import (SeriesConfig, patchify, pinball_loss, quantile_shifts,
                                        revin)
from monotile.modalities.series_io import fill_missing, window_index

from conftest import cli, set_args

# a forecaster that trains in seconds on 2 cores
TINY = {"n_layer": "2", "n_head": "2", "d_model": "16", "d_ff": "32", "batch_size": "64",
        "max_steps": "60", "eval_interval": "60", "log_interval": "10", "warmup_steps": "5",
        "lr": "3e-3", "seed": "0", "dropout": "0", "lookback": "96", "horizon": "24"}


# ---- the math, against independent references -------------------------------------------

def test_revin_matches_plain_math_and_makes_forecasts_equivariant():
    x = torch.randn(5, 64, dtype=torch.float64) * 3 + 7
    z, mu, sigma = revin(x)
    a = x.numpy()
    assert np.allclose(mu.squeeze(1).numpy(), a.mean(1))
    assert np.allclose(sigma.squeeze(1).numpy(), np.sqrt(a.var(1) + 1e-5))
    expected = (a - a.mean(1, keepdims=True)) / np.sqrt(a.var(1, keepdims=True) + 1e-5)
    assert np.allclose(z.numpy(), expected)
    # without the affine part, a window scaled by s and shifted by b is forecast as s q + b
    from monotile.core.transformer import ModelConfig
    from monotile.modalities.series import PatchForecaster
    torch.manual_seed(0)
    model = PatchForecaster(ModelConfig(n_layer=1, n_head=2, d_model=8, positions="none",
                                        context=5), lookback=32, horizon=6, patch_len=8,
                            stride=8, n_quantiles=3).eval()
    x = torch.randn(4, 32) * 10
    with torch.no_grad():
        assert torch.allclose(model(2.5 * x + 100), 2.5 * model(x) + 100, atol=1e-3)


def test_patches_are_patchtsts_replication_pad_and_unfold():
    x = torch.randn(3, 336)
    p = patchify(x, 16, 8)
    ref = torch.nn.ReplicationPad1d((0, 8))(x.unsqueeze(1)).squeeze(1).unfold(-1, 16, 8)
    assert p.shape == (3, 42, 16) == (3, (336 - 16) // 8 + 2, 16)
    assert torch.equal(p, ref)
    assert torch.equal(p[:, 1], x[:, 8:24]) and torch.equal(p[:, -1, -8:], x[:, -1:].expand(3, 8))


def test_pinball_loss_is_the_quantile_check_function():
    torch.manual_seed(0)
    q, y, taus = torch.randn(4, 6, 3), torch.randn(4, 6), (0.1, 0.5, 0.9)
    ref = np.mean([max(t * (y[b, h] - q[b, h, k]).item(), (t - 1) * (y[b, h] - q[b, h, k]).item())
                   for b in range(4) for h in range(6) for k, t in enumerate(taus)])
    assert pinball_loss(q, y, taus).item() == pytest.approx(ref, rel=1e-6)
    # at the median it is half the absolute error
    assert pinball_loss(q[..., 1:2], y, (0.5,)).item() == pytest.approx(
        0.5 * (q[..., 1] - y).abs().mean().item(), rel=1e-6)
    # mse_weight adds w times the median's mean squared error
    mse = np.mean([(y[b, h].item() - q[b, h, 1].item()) ** 2 for b in range(4) for h in range(6)])
    assert pinball_loss(q, y, taus, mse_weight=0.5).item() == pytest.approx(ref + 0.5 * mse,
                                                                           rel=1e-6)


def test_calibration_shifts_make_each_level_hold_on_the_windows_it_saw():
    torch.manual_seed(0)
    n, h, taus = 400, 5, (0.1, 0.5, 0.9)
    sigma = torch.rand(n, 1) + 0.5
    y = torch.randn(n, h) * 2 * sigma  # the truth is twice as spread as the forecast says
    q = torch.stack([-1.2816 * sigma.expand(n, h), torch.zeros(n, h),
                     1.2816 * sigma.expand(n, h)], -1)
    s = quantile_shifts(q, y, sigma, taus)
    r = ((y[..., None] - q) / sigma[..., None]).reshape(-1, 3).numpy()
    assert s.tolist() == pytest.approx([np.quantile(r[:, 0], 0.1), 0.0,
                                        np.quantile(r[:, 2], 0.9)], rel=1e-6)
    shifted = q + s * sigma[..., None]
    below = (y[..., None] <= shifted).float().mean((0, 1))
    assert below[0].item() == pytest.approx(0.1, abs=2 / (n * h))
    assert below[2].item() == pytest.approx(0.9, abs=2 / (n * h))
    assert ((q[..., 0] <= y) & (y <= q[..., 2])).float().mean() < 0.55  # before: far too narrow


def test_missing_values_are_interpolated_like_pandas():
    import pandas as pd
    v = np.array([np.nan, 1.0, np.nan, np.nan, 4.0, 5.0, np.nan, 2.0, np.nan, np.nan])
    ref = pd.Series(v).interpolate(limit_direction="both").to_numpy()
    assert np.allclose(fill_missing(v), ref)


def test_seasonal_indices_match_statsmodels_decomposition():
    from statsmodels.tsa.seasonal import seasonal_decompose

    from monotile.modalities.statistical import seasonal_indices, seasonality_test
    rng = np.random.default_rng(0)
    t = np.arange(120)
    y = (50 + 0.3 * t) * (1 + 0.2 * np.sin(2 * np.pi * t / 12)) + rng.normal(0, 0.5, 120)
    ref = seasonal_decompose(y, model="multiplicative", period=12).seasonal[:12]
    assert np.allclose(seasonal_indices(y, 12), ref, atol=1e-9)
    assert seasonality_test(y, 12) and not seasonality_test(rng.normal(10, 1, 120), 12)


def test_m4_weekly_naive2_scores_m4s_published_figures():
    """M4's Naive2 on the weekly series: sMAPE 9.161, MASE 2.777 (Makridakis et al. 2020)."""
    from monotile.modalities.metrics import mase, smape
    from monotile.modalities.series import SeriesTask
    from monotile.modalities.statistical import naive2
    task = SeriesTask(SeriesConfig(data="m4-weekly", lookback=52, horizon=13, patch_len=8,
                                   stride=4, scale=False, season=1))
    d = task.data()
    assert len(d.values) == 359
    index = window_index(d, "test", 52, 13)
    x, y = task.windows(index)
    pred = torch.from_numpy(np.stack([naive2(r, 13, 1) for r in x.double().numpy()]))
    assert smape(pred, y.double()).item() == pytest.approx(9.161, abs=5e-4)
    assert mase(pred, y.double(), task.naive_scale(index)).item() == pytest.approx(2.777, abs=5e-4)


def test_wide_and_long_csvs_give_the_same_series_and_odd_timestamps_are_reported(tmp_path):
    from monotile.modalities.series_io import load_series
    rng = np.random.default_rng(0)
    times = [f"2024-01-{1 + h // 24:02d} {h % 24:02d}:00:00" for h in range(300)]
    a, b = rng.normal(size=300).cumsum(), rng.normal(size=300)
    cell = lambda v, i: "" if i in (5, 6, 299) else f"{v:.6f}"  # gaps, one at the very end
    wide = tmp_path / "wide.csv"
    wide.write_text("date,a,b\n" + "".join(f"{t},{cell(x, i)},{y:.6f}\n"
                                           for i, (t, x, y) in enumerate(zip(times, a, b))))
    rows = [f"a,{t},{cell(x, i)}" for i, (t, x) in enumerate(zip(times, a))] + \
           [f"b,{t},{y:.6f}" for t, y in zip(times, b)]
    long = tmp_path / "long.csv"
    long.write_text("id,timestamp,value\n" + "\n".join(rng.permutation(rows)) + "\n")
    config = SeriesConfig(data=str(wide), lookback=32, horizon=8, patch_len=8, stride=8)
    w = load_series(config, wide)
    from_long = load_series(dataclasses.replace(config, data=str(long)), long)
    assert w.names == from_long.names == ("a", "b")
    for x, y in zip(w.values, from_long.values):
        assert torch.allclose(x, y)
    raw = w.values[0] * w.std[0] + w.mean[0]  # gaps interpolated, the end carried
    assert raw[5].item() == pytest.approx(a[4] + (a[7] - a[4]) / 3, abs=1e-4)
    assert raw[299].item() == pytest.approx(a[298], abs=1e-4)
    assert w.borders == [(180, 240, 300)] * 2  # the last 20 % test, the 20 % before validate
    dup = tmp_path / "dup.csv"
    dup.write_text("date,a\n" + "".join(f"{t},{x}\n" for t, x in zip(times[:3] + times[2:], a)))
    with pytest.warns(UserWarning, match="1 duplicate timestamps"):
        load_series(dataclasses.replace(config, data=str(dup)), dup)
    odd = tmp_path / "odd.csv"
    odd.write_text("date,a\n" + "".join(f"{t},{x}\n" for i, (t, x) in
                                        enumerate(zip(times, a)) if i != 50))
    with pytest.warns(UserWarning, match="1 irregular steps"):
        load_series(dataclasses.replace(config, data=str(odd)), odd)


# ---- the ETTh1 protocol ---------------------------------------------------------------------

def test_etth1_split_is_the_informer_protocol():
    from monotile.modalities.series import SeriesTask
    task = SeriesTask(SeriesConfig())
    d = task.data()
    assert len(d.values) == 7 and all(len(v) == 17420 for v in d.values)
    assert d.borders == [(8640, 11520, 14400)] * 7
    assert d.names == ("HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
    # the scaler is fitted on the training rows only
    train = torch.stack([v[:8640] for v in d.values])
    assert torch.allclose(train.mean(1), torch.zeros(7), atol=1e-4)
    assert not torch.allclose(torch.stack([v[8640:14400] for v in d.values]).mean(1),
                              torch.zeros(7), atol=0.05)
    counts = [len(window_index(d, s, 336, 96)) for s in ("train", "val", "test")]
    assert counts == [7 * (8640 - 336 - 96 + 1), 7 * (2880 - 96 + 1), 7 * (2880 - 96 + 1)]
    index = window_index(d, "test", 336, 96)
    x, y = task.windows(index[index[:, 0] == 6][:1])
    assert torch.equal(x[0], d.values[6][11520 - 336:11520])
    assert torch.equal(y[0], d.values[6][11520:11616])


# ---- training, the CLI, bad input ---------------------------------------------------------

@pytest.fixture(scope="module")
def series_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("series") / "run"
    return monotile.train("series", "etth1", out=out, quiet=True, overrides=TINY)


def test_forecaster_learns_on_etth1(series_run):
    figures = series_run.state["last_eval"]
    assert figures["test_windows"] == 7 * (2880 - 24 + 1)
    # the last value repeated (persistence), on the same test windows
    x, y = series_run.task.windows(window_index(series_run.task.data(), "test", 96, 24))
    naive = ((x[:, -1:] - y) ** 2).mean().item()
    assert figures["test_mse"] < 0.9 * naive, (figures, naive)
    assert 0.5 < figures["test_coverage"] <= 1.0


def test_predict_continues_the_timestamps_with_quantiles_and_a_plot(series_run, tmp_path):
    from monotile.data import find_data
    lines = find_data("ett/ETTh1.csv").read_text().splitlines()
    history = tmp_path / "history.csv"
    history.write_text("\n".join([lines[0], *lines[1000:1200]]) + "\n")  # ends 2016-08-19 22:00
    out = cli("predict", str(series_run.dir), str(history), "--horizon", "30", "--output",
              str(tmp_path / "f.csv"), "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    rows = [r for r in result["forecast"] if r["series"] == "OT"]
    assert len(rows) == 30 and len(result["forecast"]) == 7 * 30  # beyond 24: recursively
    assert rows[0]["timestamp"] == "2016-08-19 23:00:00"
    assert rows[-1]["timestamp"] == "2016-08-21 04:00:00"
    assert all(r["q10"] <= r["q50"] == r["forecast"] <= r["q90"] for r in rows)
    assert (tmp_path / "f.csv").read_text().startswith("timestamp,series,forecast,q10,q50,q90")
    assert (tmp_path / "f.png").stat().st_size > 10_000
    # the same history in long format (id, timestamp, value), one series: the same forecast
    header = lines[0].split(",")
    long = tmp_path / "long.csv"
    long.write_text("id,timestamp,value\n" + "".join(
        f"OT,{row.split(',')[0]},{row.split(',')[header.index('OT')]}\n"
        for row in reversed(lines[1000:1200])))  # any row order: sorted by time
    again = series_run.predict([long], horizon=30)
    assert [r["forecast"] for r in again["forecast"]] == pytest.approx(
        [r["forecast"] for r in rows], rel=1e-5)
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines[:50]) + "\n")
    bad = cli("predict", str(series_run.dir), str(short))
    assert bad.returncode == 2 and "looks back 96" in bad.stderr


def test_backtest_compares_with_the_statistical_forecasters(series_run):
    out = cli("eval", str(series_run.dir), "--backtest", "2", "--json")
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["windows"] == 2 * 7 and set(figures["methods"]) == {
        "model", "naive", "seasonal_naive", "ets"}
    for m in figures["methods"].values():
        assert np.isfinite([m["mse"], m["mae"], m["mase"], m["smape"]]).all()
    too_many = cli("eval", str(series_run.dir), "--backtest", "1000")
    assert too_many.returncode == 2 and "use --backtest 120" in too_many.stderr


def test_bad_series_input_is_refused(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("date,a,b\n2020-01-01,1,x\n2020-01-02,2,3\n")
    out = cli("train", "series", "--data", str(bad), "--set", "target=b",
              "--out", str(tmp_path / "r1"))
    assert out.returncode == 2 and "not numeric" in out.stderr and "Traceback" not in out.stderr
    out = cli("train", "series", "--data", str(bad), "--set", "target=c",
              "--out", str(tmp_path / "r2"))
    assert out.returncode == 2 and "'c' is not in" in out.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    out = cli("train", "series", "--data", str(empty), "--out", str(tmp_path / "r3"))
    assert out.returncode == 2 and "no data rows" in out.stderr
    short = tmp_path / "short.csv"
    short.write_text("t,v\n" + "".join(f"{i},{i % 7}\n" for i in range(50)))
    out = cli("train", "series", "--data", str(short), "--out", str(tmp_path / "r4"),
              *set_args({"lookback": "96", "horizon": "24"}))
    assert out.returncode == 2 and "too few" in out.stderr
    assert not any((tmp_path / f"r{i}").exists() for i in range(1, 5))


def test_a_long_csvs_rows_are_ordered_by_date_not_by_text(tmp_path):
    from monotile.errors import DataError
    from monotile.modalities.series_io import read_table
    days = [3, 1, 10, 2, 11, 12]  # of January 2024, written month first, out of order
    long = tmp_path / "long.csv"
    long.write_text("id,date,value\n" + "".join(f"s,1/{d}/2024,{d}\n" for d in days))
    config = SeriesConfig(data=str(long))
    _, table, times = read_table(long, config)
    assert table["s"].tolist() == [1, 2, 3, 10, 11, 12]  # as text: 1, 10, 11, 12, 2, 3
    assert times["s"] == [f"1/{d}/2024" for d in (1, 2, 3, 10, 11, 12)]
    # the same cells read day first: 1 March, 1 January, 1 October, ...
    _, table, _ = read_table(long, dataclasses.replace(config, date_format="%d/%m/%Y"))
    assert table["s"].tolist() == [1, 2, 3, 10, 11, 12]
    march = tmp_path / "march.csv"
    march.write_text("id,date,value\n" + "".join(f"s,{d}/3/2024,{d}\n" for d in days))
    _, table, _ = read_table(march, dataclasses.replace(config, date_format="%d/%m/%Y"))
    assert table["s"].tolist() == [1, 2, 3, 10, 11, 12]
    steps = tmp_path / "steps.csv"  # step numbers order as numbers: 10 after 9
    steps.write_text("id,time,value\n" + "".join(f"s,{t},{t}\n" for t in (10, 9, 1)))
    assert read_table(steps, config)[1]["s"].tolist() == [1, 9, 10]
    bad = tmp_path / "bad.csv"
    bad.write_text("id,date,value\ns,2024-01-01,1\ns,soon,2\n")
    with pytest.raises(DataError, match=r"'soon' \(row 3\), which is not a date.*date_format"):
        read_table(bad, config)
    with pytest.raises(DataError, match="'1/3/2024' .row 2., which is not a date in %Y-%m-%d"):
        read_table(long, dataclasses.replace(config, date_format="%Y-%m-%d"))
