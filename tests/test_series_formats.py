"""Forecasting on the files benchmarks come in: one series per row (M4's layout, with its test
file), Monash's .tsf, the ETT family's borders by its columns and length, and a file that
reads two ways refused instead of guessed (series_formats.py). M4's weekly files are the real
ones in ../shared/data; the other files are written here."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch

import monotile
from monotile.data import find_data
from monotile.errors import DataError
from monotile.modalities.metrics import mase, smape
from monotile.modalities.series import SeriesConfig, SeriesTask
from monotile.modalities.series_formats import M4
from monotile.modalities.series_io import load_series, read_table, window_index
from monotile.modalities.statistical import naive2
from monotile.presets import PRESETS

from conftest import cli, set_args

# a forecaster that trains in a second or two on 2 cores
SMALL = {"n_layer": "1", "n_head": "2", "d_model": "16", "d_ff": "32", "batch_size": "16",
         "max_steps": "3", "eval_interval": "3", "log_interval": "1", "warmup_steps": "1",
         "seed": "0", "dropout": "0"}


def write_rows(path, series: dict, header: str = "V"):
    """A CSV in M4's layout: a header V1..Vn, then one quoted row per series, its id first,
    padded with empty cells to the header's width."""
    width = 1 + max(len(v) for v in series.values())
    lines = [",".join(f'"{header}{i + 1}"' for i in range(width))]
    for name, v in series.items():
        cells = [f'"{name}"'] + ["" if np.isnan(x) else f'"{x:.6f}"' for x in v]
        lines.append(",".join(cells + ['""'] * (width - len(cells))))
    path.write_text("\n".join(lines) + "\n")
    return path


def seasonal(rng, n: int, m: int) -> np.ndarray:
    """A positive series with a trend and a multiplicative season of m steps."""
    t = np.arange(n)
    return (rng.uniform(50, 500) * (1 + 0.01 * t) *
            (1 + 0.25 * np.sin(2 * np.pi * t / m + rng.uniform(0, 6))) *
            (1 + 0.02 * rng.normal(size=n)))


def m4_pair(folder, frequency: str, lengths: list[int], seed: int = 0):
    """<Frequency>-train.csv and -test.csv as M4 writes them: series of the given history
    lengths, each followed by the frequency's horizon of test values."""
    H, m = M4[frequency]
    rng = np.random.default_rng(seed)
    letter = frequency[0].upper()
    full = {f"{letter}{i + 1}": seasonal(rng, n + H, max(m, 2)) for i, n in enumerate(lengths)}
    name = frequency.capitalize()
    train = write_rows(folder / f"{name}-train.csv", {k: v[:-H] for k, v in full.items()})
    write_rows(folder / f"{name}-test.csv", {k: v[-H:] for k, v in full.items()})
    return train, full


# ---- M4 -------------------------------------------------------------------------------------

def test_m4_weekly_by_path_is_the_builtin_data_set_and_scores_m4s_naive2():
    """The real files given by path are recognised as one series per row, with the 13 test
    values of Weekly-test.csv; the series equal the built-in data set's and an independent
    reading of the two files, and Naive2 scores M4's published 9.161 / 2.777."""
    config = SeriesConfig(data="m4-weekly", lookback=52, horizon=13, patch_len=8, stride=4,
                          scale=False, season=1)
    builtin = SeriesTask(config).data()
    path = find_data("m4/Weekly-train.csv")
    task = SeriesTask(dataclasses.replace(config, data=str(path)))
    by_path = task.data()
    assert by_path.names == builtin.names and len(by_path.names) == 359
    assert by_path.borders == builtin.borders and by_path.split == "horizon"
    assert all(torch.equal(a, b) for a, b in zip(by_path.values, builtin.values))
    with open(path, newline="") as f:
        history = {r[0]: [float(c) for c in r[1:] if c] for r in list(csv.reader(f))[1:]}
    with open(path.with_name("Weekly-test.csv"), newline="") as f:
        test = {r[0]: [float(c) for c in r[1:] if c] for r in list(csv.reader(f))[1:]}
    for name, v in zip(by_path.names, by_path.values):
        assert v.tolist() == pytest.approx(history[name] + test[name], rel=1e-6)
    assert "Weekly-test.csv" in by_path.split_note
    index = window_index(by_path, "test", 52, 13)
    assert len(index) == 359
    x, y = task.windows(index)
    pred = torch.from_numpy(np.stack([naive2(r, 13, 1) for r in x.double().numpy()]))
    assert smape(pred, y.double()).item() == pytest.approx(9.161, abs=5e-4)
    assert mase(pred, y.double(), task.naive_scale(index)).item() == pytest.approx(2.777,
                                                                                 abs=5e-4)
    # left at 0, the horizon is the test file's and the season weekly's
    auto = load_series(SeriesConfig(data=str(path), lookback=52, patch_len=8, stride=4,
                                    scale=False), path)
    assert (auto.horizon, auto.season) == (13, 1) and auto.borders == builtin.borders


def test_the_m4_presets_carry_the_competitions_horizons_and_seasons():
    for frequency, (horizon, season) in M4.items():
        series = PRESETS[f"m4-{frequency}"]["series"]
        assert (series["horizon"], series["season"]) == (horizon, season)
        SeriesConfig(**series)  # patches tile the look-back


def test_an_m4_file_gets_its_own_horizon_and_a_preset_of_another_frequency_is_refused(
        tmp_path, monkeypatch):
    train, full = m4_pair(tmp_path, "hourly", [400, 250, 300])
    d = load_series(SeriesConfig(data=str(train), lookback=96, patch_len=24, stride=12,
                                 scale=False), train)
    assert (d.horizon, d.season, d.split) == (48, 24, "horizon")
    assert [len(v) for v in d.values] == [448, 298, 348]
    assert d.values[1][-48:].tolist() == pytest.approx(full["H2"][-48:].tolist(), rel=1e-5)
    with pytest.raises(DataError, match=r"Hourly-test.csv beside Hourly-train.csv sets the "
                       r"horizon at 48 .*--horizon 48 \(or --preset m4-hourly\)"):
        monotile.train("series", "m4-weekly", data=train, out=tmp_path / "run", quiet=True,
                       overrides=SMALL)
    assert not (tmp_path / "run").exists()
    # a built-in M4 name needs its test file beside the training file
    (tmp_path / "m4").mkdir()
    shutil.copy(train, tmp_path / "m4" / "Hourly-train.csv")
    monkeypatch.setenv("MONOTILE_DATA", str(tmp_path))
    with pytest.raises(DataError, match="M4's Hourly-test.csv is not beside"):
        SeriesTask(SeriesConfig(**PRESETS["m4-hourly"]["series"])).data()


def test_m4_quarterly_trains_and_is_scored_as_the_competition_scores_it(tmp_path):
    """One other frequency end to end: Naive2 on each series' whole history (a short series'
    padding left out), sMAPE and MASE as M4 defines them, OWA, and Theta and ETS beside."""
    train, full = m4_pair(tmp_path, "quarterly", [40, 24, 60, 10, 33, 16], seed=1)
    run = monotile.train("series", "m4-quarterly", data=train, out=tmp_path / "run",
                         quiet=True, overrides=SMALL)
    d = run.task.data()
    L = run.task.config.lookback  # 10 values and 8 to test, padded to one training window
    assert d.pads[3] == 3 * 8 + L - (10 + 8) and d.borders[3] == (L + 8, L + 16, L + 24)
    figures = run.report()
    assert figures["split"].startswith("horizon: the last 8 values of each series test "
                                       "(Quarterly-test.csv)")
    assert figures["test_windows"] == 6
    n2_smape, n2_mase = [], []
    for v in full.values():  # M4's definitions, on the files' own values
        history, truth = v[:-8], v[-8:]
        f = naive2(history, 8, 4)
        n2_smape.append(np.mean(200 * np.abs(truth - f) / (np.abs(truth) + np.abs(f))))
        n2_mase.append(np.mean(np.abs(truth - f)) / np.mean(np.abs(history[4:] - history[:-4])))
    assert figures["naive2_smape"] == pytest.approx(np.mean(n2_smape), rel=1e-4)
    assert figures["naive2_mase"] == pytest.approx(np.mean(n2_mase), rel=1e-4)
    assert figures["owa"] == pytest.approx(0.5 * (figures["test_smape"] / figures["naive2_smape"]
                                                  + figures["test_mase"] / figures["naive2_mase"]))
    for method in ("theta", "ets"):
        assert np.isfinite([figures[f"{method}_smape"], figures[f"{method}_mase"],
                            figures[f"{method}_owa"]]).all()


# ---- other one-series-per-row files, and files that read two ways ---------------------------

def test_a_csv_of_rows_of_different_lengths_is_one_series_per_row(tmp_path):
    rng = np.random.default_rng(0)
    series = {"shop": rng.normal(10, 1, 60), "cafe": rng.normal(5, 1, 45),
              "kiosk": rng.normal(1, 0.1, 20)}
    series["cafe"][10] = np.nan  # a gap inside a row
    path = write_rows(tmp_path / "sales.csv", series, header="v")
    config = SeriesConfig(data=str(path), lookback=16, horizon=4, patch_len=4, stride=4)
    _, table, times = read_table(path, config)  # as `predict` reads a history
    assert [len(v) for v in table.values()] == [60, 45, 20] and times["kiosk"][-1] == "19"
    d = load_series(config, path)
    assert d.names == ("shop", "cafe", "kiosk") and d.split == "horizon"
    assert d.pads == (0, 0, 8)  # kiosk: 20 values; one training window and two more: 16 + 3 x 4
    assert d.borders == [(52, 56, 60), (37, 41, 45), (20, 24, 28)]
    cafe = d.values[1] * d.std[1] + d.mean[1]
    assert cafe[10].item() == pytest.approx((series["cafe"][9] + series["cafe"][11]) / 2,
                                            abs=1e-4)
    assert "the last 4 values of each series test" in d.split_note
    # the same rows without a header: the first line is a series too
    bare = tmp_path / "bare.csv"
    bare.write_text("".join(f"{k}," + ",".join(f"{x:.3f}" for x in np.nan_to_num(v)) + "\n"
                            for k, v in series.items()))
    _, table, _ = read_table(bare, dataclasses.replace(config, layout="rows"))
    assert list(table) == ["shop", "cafe", "kiosk"]


def test_a_file_that_reads_two_ways_is_refused_and_layout_chooses(tmp_path):
    path = tmp_path / "table.csv"
    path.write_text('"V1","V2","V3","V4","V5"\n' + "".join(
        f'"{k}",{",".join(str(i + j) for j in range(4))}\n' for i, k in enumerate("abc")))
    out = cli("train", "series", "--data", str(path), "--out", str(tmp_path / "run"),
              *set_args({"lookback": "4", "horizon": "1", "patch_len": "4", "stride": "4"}))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "table.csv reads two ways: one series per row (ids 'a', 'b', ..." in out.stderr
    assert "--set layout=rows or --set layout=wide" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()
    config = SeriesConfig(data=str(path))
    _, rows, _ = read_table(path, dataclasses.replace(config, layout="rows"))
    assert list(rows) == ["a", "b", "c"] and rows["c"].tolist() == [2, 3, 4, 5]
    times, wide, _ = read_table(path, dataclasses.replace(config, layout="wide"))
    assert list(wide) == ["V2", "V3", "V4", "V5"] and times == ["a", "b", "c"]
    assert wide["V2"].tolist() == [0, 1, 2]
    # a named header, or a time column, is a wide table as before
    named = tmp_path / "named.csv"
    named.write_text("week,a,b\nw1,1,2\nw2,3,4\n")
    assert list(read_table(named, config)[1]) == ["a", "b"]


# ---- Monash's .tsf ----------------------------------------------------------------------

def write_tsf(path, series: dict, horizon: int = 7, frequency: str = "daily"):
    path.write_text(
        "# a comment\n@relation sample\n@attribute series_name string\n"
        "@attribute start_timestamp date\n"
        f"@frequency {frequency}\n@horizon {horizon}\n@missing true\n@equallength false\n"
        "@data\n" + "".join(f"{k}:2020-01-01 00-00-00:" +
                            ",".join("?" if np.isnan(x) else f"{x:.5f}" for x in v) + "\n"
                            for k, v in series.items()))
    return path


def test_a_tsf_file_is_read_with_its_frequency_horizon_and_missing_values_and_scored_by_mase(
        tmp_path):
    rng = np.random.default_rng(2)
    series = {"T1": seasonal(rng, 120, 7), "T2": seasonal(rng, 90, 7), "T3": seasonal(rng, 30, 7)}
    series["T2"][40] = np.nan
    path = write_tsf(tmp_path / "sample.tsf", series)
    base = {"lookback": "28", "patch_len": "7", "stride": "7"}
    run = monotile.train("series", None, data=path, out=tmp_path / "run", quiet=True,
                         overrides={**SMALL, **base})
    c, d = run.task.config, run.task.data()
    assert (c.horizon, c.season, d.split) == (7, 7, "horizon")  # @horizon, daily's season
    assert d.names == ("T1", "T2", "T3") and d.pads == (0, 0, 3 * 7 + 28 - 30)
    t2 = d.values[1] * d.std[1] + d.mean[1]
    assert t2[40].item() == pytest.approx((series["T2"][39] + series["T2"][41]) / 2, rel=1e-4)
    # MASE as the archive reports it: the mean over series of mean |y - f| over the horizon
    # / mean |x_t - x_(t-7)| over the series before its last 7 values (no padding)
    index, _, q, y = run.task.forecast_split(run.model, "test")
    med = q[..., c.quantiles.index(0.5)]
    forecast = run.task.unscale(index, med)[0].numpy()
    expected = []
    for i, v in enumerate(series.values()):
        v = np.interp(np.arange(len(v)), np.flatnonzero(~np.isnan(v)), v[~np.isnan(v)])
        history, truth = v[:-7], v[-7:]
        expected.append(np.mean(np.abs(truth - forecast[i])) /
                        np.mean(np.abs(history[7:] - history[:-7])))
    assert run.task.metrics(index, q, y)["mase"] == pytest.approx(np.mean(expected), rel=1e-4)
    figures = run.report()
    assert figures["split"].startswith("horizon: the last 7") and np.isfinite(figures["owa"])
    with pytest.raises(DataError, match=r"sample.tsf sets the horizon at 7 \(its @horizon\)"):
        load_series(SeriesConfig(data=str(path), horizon=5, lookback=28, patch_len=7,
                                 stride=7), path)
    bad = tmp_path / "bad.tsf"
    bad.write_text(path.read_text().replace("2020-01-01 00-00-00:", "", 1))
    with pytest.raises(DataError, match="line 10 of bad.tsf has 1 attribute before its "
                                        "values, not the 2"):
        load_series(SeriesConfig(data=str(bad)), bad)


# ---- the ETT family ---------------------------------------------------------------------

def ett_like(path, rows: int, minutes: int = 60, columns=None):
    """A CSV of ETT's columns (or others), `rows` rows `minutes` apart from 2016-07-01."""
    import pandas as pd
    columns = columns or ["HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT"]
    t = pd.date_range("2016-07-01", periods=rows, freq=f"{minutes}min").strftime(
        "%Y-%m-%d %H:%M:%S")
    v = np.sin(np.arange(rows) / 24)[:, None] + np.arange(len(columns))
    path.write_text(",".join(["date", *columns]) + "\n" + "".join(
        f"{s}," + ",".join(f"{x:.3f}" for x in r) + "\n" for s, r in zip(t, v)))
    return path


def test_the_ett_family_gets_informers_borders_by_its_columns_and_length(tmp_path):
    etth2 = tmp_path / "ETTh2.csv"  # ETTh1 under another name
    shutil.copy(find_data("ett/ETTh1.csv"), etth2)
    config = SeriesConfig(data=str(etth2), lookback=96, horizon=24, patch_len=16, stride=8)
    d = load_series(config, etth2)
    assert d.split == "ett" and d.borders == [(8640, 11520, 14400)] * 7
    assert "rows [0, 8640) train, [8640, 11520) validate, [11520, 14400) test" in d.split_note
    train = torch.stack([v[:8640] for v in d.values])  # the scaler saw the training rows only
    assert torch.allclose(train.mean(1), torch.zeros(7), atol=1e-4)
    ettm = ett_like(tmp_path / "ETTm1.csv", 69680, minutes=15)
    assert load_series(config, ettm).borders == [(34560, 46080, 57600)] * 7
    cut = ett_like(tmp_path / "cut.csv", 15000)
    with pytest.warns(UserWarning, match="ETT family's columns but 15,000 rows"):
        assert load_series(config, cut).split == "fraction"
    other = ett_like(tmp_path / "grid.csv", 15000, columns=["load", "price"])
    d = load_series(dataclasses.replace(config, split="ett"), other)
    assert d.borders == [(8640, 11520, 14400)] * 2
    with pytest.raises(DataError, match="split=ett needs 20 months of 30 days"):
        load_series(dataclasses.replace(config, split="ett"), ett_like(tmp_path / "s.csv", 9000))


def test_eval_says_which_split_it_used(tmp_path):
    etth2 = tmp_path / "ETTh2.csv"
    shutil.copy(find_data("ett/ETTh1.csv"), etth2)
    run = monotile.train("series", "etth1", data=etth2, out=tmp_path / "run", quiet=True,
                         overrides={**SMALL, "lookback": "96", "horizon": "24"})
    out = cli("eval", str(run.dir), "--json")
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["split"].startswith("ett: Informer's borders, rows [0, 8640) train")
    assert figures["test_windows"] == 7 * (2880 - 24 + 1)
    text = cli("eval", str(run.dir))
    assert "split  ett: Informer's borders" in text.stdout
