"""Scoring a forecaster beside the forecasts it has to beat.

Report:    the split, the validation and test metrics (SeriesTask.evaluate), and on the same
           test windows the naive (last value), seasonal naive (the last season repeated) and,
           for up to 5000 windows, M4's Naive2 forecasts; OWA = (sMAPE / sMAPE_Naive2 +
           MASE / MASE_Naive2) / 2, M4's overall weighted average, sMAPE and MASE each the
           mean over the test windows
M4:        where each series has one test window (split=horizon: M4's and Monash's protocol),
           Naive2, Theta and ETS (statistical.py) are fitted on each series' whole history
           before its test values (its padding left out; at most its last 4000 values), as
           the competition fitted them, and each gets its sMAPE, MASE and OWA; Theta and ETS
           for at most MAX_FITTED series
Backtest:  rolling origin: each series forecast from k origins H apart, the last one H before
           its end, all in its test part; the model from the look-back before each origin, the
           statistical methods (statistical.py) fitted on everything before it (at most 4000
           values)
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError
from . import statistical

if TYPE_CHECKING:
    from .series import SeriesTask


MAX_FITTED = 5000  # series that `eval` fits Theta and ETS for (M4 weekly 359, daily 4,227)


def with_baselines(task: SeriesTask, model, progress: bool = False) -> dict:
    """The split in words, evaluate()'s figures, the naive, seasonal naive and Naive2
    forecasts' MSE, MAE, MASE and sMAPE on the same test windows, and the model's OWA; on
    M4's protocol Theta's and ETS's too (module docstring)."""
    d = task.data()
    out, (index, x, y) = task._evaluate(model, progress)
    out = {"split": d.split_note, **out}
    m = task.config.season
    for name, pred in (("naive", x[:, -1:].expand_as(y)),
                       ("seasonal_naive", _repeat_season(x, m, y.size(1)))):
        q = pred.unsqueeze(-1).expand(*pred.shape, len(task.config.quantiles))
        figures = task.metrics(index, q, y)
        out.update({f"{name}_{k}": v for k, v in figures.items()
                    if k in ("mse", "mae", "mase", "smape")})
    if d.split == "horizon" and len(index) == len(d.values):
        out.update(_fitted_baselines(task, index, y, out, progress))
    elif len(index) <= 5000:  # M4's overall weighted average against its Naive2 benchmark
        raw = task.unscale(index, x)[0].double().numpy()
        pred = torch.from_numpy(np.stack([statistical.naive2(r, y.size(1), m) for r in raw]))
        q = task.scale(index, pred).float().unsqueeze(-1).expand(
            *pred.shape, len(task.config.quantiles))
        figures = task.metrics(index, q, y)
        out["naive2_smape"], out["naive2_mase"] = figures["smape"], figures["mase"]
        out["owa"] = 0.5 * (out["test_smape"] / figures["smape"] +
                            out["test_mase"] / figures["mase"])
    return out


def _fitted_baselines(task: SeriesTask, index: torch.Tensor, y: torch.Tensor, out: dict,
                      progress: bool) -> dict:
    """Naive2, Theta and ETS, each fitted on the whole history before its series' one test
    window: their sMAPE, MASE and OWA, and the model's OWA."""
    H, m, Q = y.size(1), task.config.season, len(task.config.quantiles)
    histories = [_history(task, int(i), int(start) + task.config.lookback)
                 for i, start in index.tolist()]
    methods = ("naive2", "theta", "ets") if len(index) <= MAX_FITTED else ("naive2",)
    figures = {}
    for method in tqdm(methods, disable=not progress, desc="baselines", unit="method"):
        pred = torch.from_numpy(np.stack([statistical.forecast(method, h, H, m)
                                          for h in histories]))
        q = task.scale(index, pred).float().unsqueeze(-1).expand(*pred.shape, Q)
        f = task.metrics(index, q, y)
        figures[f"{method}_smape"], figures[f"{method}_mase"] = f["smape"], f["mase"]
    n2 = figures["naive2_smape"], figures["naive2_mase"]
    figures["owa"] = 0.5 * (out["test_smape"] / n2[0] + out["test_mase"] / n2[1])
    for method in methods[1:]:
        figures[f"{method}_owa"] = 0.5 * (figures[f"{method}_smape"] / n2[0] +
                                          figures[f"{method}_mase"] / n2[1])
    if len(methods) == 1:
        figures["baselines_note"] = (f"theta and ets are fitted for at most {MAX_FITTED:,} "
                                     f"series, not {len(index):,}; fit them from Python with "
                                     "run.task.backtest(run.model, 1, methods=('theta', "
                                     "'ets'))")
    return figures


def _history(task: SeriesTask, i: int, end: int) -> np.ndarray:
    """Series i before row `end` in the data's own units, without its front padding (at most
    its last 4000 values)."""
    d = task.data()
    start = max(d.pads[i] if d.pads else 0, end - 4000)
    v = d.values[i][start:end]
    return task.unscale(torch.tensor([[i, 0]]), v[None])[0][0].numpy()


def rolling_backtest(task: SeriesTask, model, k: int,
                     methods=("naive", "seasonal_naive", "ets"), progress: bool = False) -> dict:
    """The backtest of the module docstring from k origins. Per method: MSE and MAE (model
    units), MASE, sMAPE; the model's interval coverage too."""
    c, d = task.config, task.data()
    H = c.horizon
    if k <= 0:
        raise DataError(f"--backtest {k} is invalid: give a positive number of origins")
    fits = min((b[2] - b[1]) // H for b in d.borders)
    if k > fits:
        raise DataError(f"--backtest {k} needs {k * H} test values per series; this run's "
                        f"test part holds {fits} forecast{'s' if fits != 1 else ''} of {H}"
                        f": use --backtest {max(fits, 1)}")
    index = torch.tensor([(i, b[2] - H * (k - j) - c.lookback) for i, b in enumerate(d.borders)
                          for j in range(k)])
    x, y = task.windows(index)
    with torch.no_grad():
        q = model(x.to(next(model.parameters()).device)).float().cpu()
    results = {"model": task.metrics(index, task.calibrated(q, x, task.shifts(model)), y)}
    for method in tqdm(methods, disable=not progress, desc="baselines", unit="method"):
        preds = []
        for i, start in index.tolist():
            preds.append(statistical.forecast(method, _history(task, i, start + c.lookback),
                                              H, c.season))
        pred = torch.from_numpy(np.stack(preds))
        pred = task.scale(index, pred).float()
        qs = pred.unsqueeze(-1).expand(*pred.shape, len(c.quantiles))
        figures = task.metrics(index, qs, y)
        figures.pop("coverage"), figures.pop("pinball")
        results[method] = figures
    return {"split": d.split_note, "origins": k, "windows": len(index), "horizon": H,
            "season": c.season, "methods": results}


def _repeat_season(x: torch.Tensor, m: int, h: int) -> torch.Tensor:
    """The seasonal naive forecast of windows x (N, L): their last m values repeated."""
    if m <= 1 or x.size(1) < m:
        return x[:, -1:].expand(-1, h)
    return x[:, -m:].repeat(1, math.ceil(h / m))[:, :h]
