"""Scoring a forecaster beside the forecasts it has to beat.

Report:    the validation and test metrics (SeriesTask.evaluate), and on the same test
           windows the naive (last value), seasonal naive (the last season repeated) and, for
           up to 5000 windows, M4's Naive2 forecasts; OWA = (sMAPE / sMAPE_Naive2 +
           MASE / MASE_Naive2) / 2, M4's overall weighted average
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


def with_baselines(task: SeriesTask, model, progress: bool = False) -> dict:
    """evaluate()'s figures, with the naive, seasonal naive and Naive2 forecasts' MSE, MAE,
    MASE and sMAPE on the same test windows, and the model's OWA."""
    out, (index, x, y) = task._evaluate(model, progress)
    m = task.config.season
    for name, pred in (("naive", x[:, -1:].expand_as(y)),
                       ("seasonal_naive", _repeat_season(x, m, y.size(1)))):
        q = pred.unsqueeze(-1).expand(*pred.shape, len(task.config.quantiles))
        figures = task.metrics(index, q, y)
        out.update({f"{name}_{k}": v for k, v in figures.items()
                    if k in ("mse", "mae", "mase", "smape")})
    if len(index) <= 5000:  # M4's overall weighted average against its Naive2 benchmark
        raw = task.unscale(index, x)[0].double().numpy()
        pred = torch.from_numpy(np.stack([statistical.naive2(r, y.size(1), m) for r in raw]))
        q = task.scale(index, pred).float().unsqueeze(-1).expand(
            *pred.shape, len(task.config.quantiles))
        figures = task.metrics(index, q, y)
        out["naive2_smape"], out["naive2_mase"] = figures["smape"], figures["mase"]
        out["owa"] = 0.5 * (out["test_smape"] / figures["smape"] +
                            out["test_mase"] / figures["mase"])
    return out


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
    raw = [task.unscale(torch.tensor([[i, 0]]), v[None])[0][0].numpy()
           for i, v in enumerate(d.values)]
    for method in tqdm(methods, disable=not progress, desc="baselines", unit="method"):
        preds = []
        for i, start in index.tolist():
            origin = start + c.lookback
            preds.append(statistical.forecast(method, raw[i][max(0, origin - 4000):origin],
                                              H, c.season))
        pred = torch.from_numpy(np.stack(preds))
        pred = task.scale(index, pred).float()
        qs = pred.unsqueeze(-1).expand(*pred.shape, len(c.quantiles))
        figures = task.metrics(index, qs, y)
        figures.pop("coverage"), figures.pop("pinball")
        results[method] = figures
    return {"origins": k, "windows": len(index), "horizon": H, "season": c.season,
            "methods": results}


def _repeat_season(x: torch.Tensor, m: int, h: int) -> torch.Tensor:
    """The seasonal naive forecast of windows x (N, L): their last m values repeated."""
    if m <= 1 or x.size(1) < m:
        return x[:, -1:].expand(-1, h)
    return x[:, -m:].repeat(1, math.ceil(h / m))[:, :h]
