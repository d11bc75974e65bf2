"""Time series: a window is normalised, cut into patches, and each patch becomes a token.

RevIN:     x_hat = (x - mu) / sigma, mu and sigma^2 the mean and (biased) variance of the
           look-back window, sigma = sqrt(var + eps); the forecast is y = y_hat sigma + mu
           (Kim et al. 2022, without the affine part, as PatchTST's ETT recipes)
Patches:   the window, padded at the end with `stride` copies of its last value, is cut into
           N = (L - P) / S + 2 patches of P values every S steps; token_i = W_e patch_i + E_pos[i]
Channels:  every channel is its own series through the same weights (channel independence)
Head:      q = sort(W_h flatten(z_L) + b), reshaped to (horizon, quantiles) (PatchTST's flatten
           head; sorting the quantiles of each step never raises the pinball loss: Chernozhukov
           et al. 2010)
Calibration: each quantile level tau but the median is shifted by what the validation
           windows say it missed: q'_tau = q_tau + sigma s_tau, s_tau = the tau-quantile of
           (y - q_tau) / sigma over the validation windows and steps (sigma the window's RevIN
           scale), so that each level holds on held-out data (conformalised quantiles;
           Romano et al. 2019)
Loss:      pinball: mean over steps and quantiles tau of max(tau (y - q_tau), (tau - 1)(y - q_tau));
           the median (tau = 0.5) is the point forecast. mse_weight w > 0 adds w mean (y - q_0.5)^2,
           which pulls the point forecast from the median toward the mean, the forecast that
           MSE rewards
(Nie et al. 2023, "A Time Series is Worth 64 Words".)
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.transformer import ModelConfig, Transformer, init_weights
from ..data import find_data
from ..errors import ConfigError, DataError, check_positive, invalid
from .base import TaskBase, register
from .metrics import mase, smape
from .series_eval import rolling_backtest, with_baselines
from .series_formats import LAYOUTS, SPLITS
from .series_io import BUILTIN, SeriesData, load_series, window_index
from .series_predict import (History, continue_times, forecast_rows, format_backtest,
                             format_forecasts, read_history)


MAX_HORIZON = 10_000  # steps one forecast may reach (recursively: a bound on the work)
MAX_FORECAST_VALUES = 1_000_000  # series x steps of one history's forecast (its rows)


@dataclass(frozen=True, kw_only=True)
class SeriesConfig:
    data: str = "etth1"           # etth1 | m4-yearly ... m4-hourly | co2 | sunspots | a file:
                                  #   a CSV (wide, long or one series per row) or a .tsf
    layout: str = "auto"          # auto | wide (a time column, one column per series) | long
                                  #   (id,timestamp,value) | rows (id,v1,v2,...: M4's) | tsf
                                  #   (Monash's); auto: what the file shows, or an error naming
                                  #   the layouts it could be (series_formats.py)
    split: str = "auto"           # auto | fraction | horizon (the last H test, the H before
                                  #   validate) | ett (Informer's 12/4/4 months); auto: ett
                                  #   for the ETT family, horizon for rows and .tsf, else fraction
    target: tuple = ()            # the columns to forecast; () = every numeric column
    time_col: str = ""            # "" = the first column if it is not numeric
    date_format: str = ""         # how a long CSV's times are written (strftime, e.g.
                                  #   %d/%m/%Y); "" = as pandas.to_datetime reads them
    lookback: int = 336           # L: values the model sees
    horizon: int = 0              # H: values it forecasts; 0 = what the data declares (M4's
                                  #   test file, a .tsf's @horizon), else 96
    patch_len: int = 16           # P
    stride: int = 8               # S
    quantiles: tuple = (0.1, 0.5, 0.9)
    revin: bool = True            # normalise each window by its own mean and std
    scale: bool = True            # standardise each column by its training mean and std
    val_fraction: float = 0.2     # time-ordered splits of a CSV without fixed borders:
    test_fraction: float = 0.2    #   the last test_fraction is test, the val_fraction before it
    season: int = 0               # m of MASE's seasonal naive scale (24 for hourly data);
                                  #   0 = what the data declares (a .tsf's frequency, M4's
                                  #   file name), else 1
    head_dropout: float = 0.0
    mse_weight: float = 0.0       # w: loss = pinball + w MSE(median); > 0 when MSE is the metric
    calibrate: bool = True        # shift the quantiles so that their levels hold on validation
    eval_batch_size: int = 1024
    columns: tuple = ()           # the target columns, filled at train time
    mean: tuple = ()              # their training mean and std, filled at train time (scale)
    std: tuple = ()

    def __post_init__(self):
        for name in ("target", "quantiles", "columns", "mean", "std"):
            value = getattr(self, name)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "quantiles", tuple(float(q) for q in self.quantiles))

        check_positive(self, ("lookback", "patch_len", "stride", "eval_batch_size"))
        for name in ("horizon", "season"):
            if getattr(self, name) < 0:
                invalid(self, name, "it must be a positive integer, or 0 for what the data "
                        "declares")
        if self.layout not in LAYOUTS:
            invalid(self, "layout", f"choose one of {', '.join(LAYOUTS)}")
        if self.split not in SPLITS:
            invalid(self, "split", f"choose one of {', '.join(SPLITS)}")
        if self.patch_len > self.lookback:
            invalid(self, "patch_len", f"a patch cannot be longer than lookback={self.lookback}")
        if (self.lookback - self.patch_len) % self.stride:
            invalid(self, "stride", f"lookback - patch_len = {self.lookback - self.patch_len} "
                    "must be a multiple of it, so the patches tile the window")
        if not self.quantiles or any(not 0 < q < 1 for q in self.quantiles) or \
                list(self.quantiles) != sorted(set(self.quantiles)):
            invalid(self, "quantiles", "give increasing levels in (0, 1), e.g. 0.1,0.5,0.9")
        if 0.5 not in self.quantiles:
            invalid(self, "quantiles", "include 0.5: the median is the point forecast")
        for name in ("val_fraction", "test_fraction"):
            if not 0 < getattr(self, name) < 0.5:
                invalid(self, name, "it must be in (0, 0.5)")
        if not 0 <= self.head_dropout < 1:
            invalid(self, "head_dropout", "it must be in [0, 1)")
        if self.mse_weight < 0:
            invalid(self, "mse_weight", "it must be >= 0")

    @property
    def n_patches(self) -> int:
        return (self.lookback - self.patch_len) // self.stride + 2


# ---- the math -----------------------------------------------------------------------------

def revin(x: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) windows -> (x - mu) / sigma and mu, sigma (B, 1): mean and sqrt(biased var + eps)
    over the window's time steps."""
    mu = x.mean(-1, keepdim=True)
    sigma = torch.sqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
    return (x - mu) / sigma, mu, sigma


def patchify(x: torch.Tensor, patch_len: int, stride: int) -> torch.Tensor:
    """(B, L) -> (B, N, P): pad the end with `stride` copies of the last value, then take P
    values every S steps, N = (L - P) / S + 2 (PatchTST's padding_patch="end")."""
    x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], stride)], dim=-1)
    return x.unfold(-1, patch_len, stride)


def pinball_loss(pred: torch.Tensor, y: torch.Tensor, quantiles,
                 mse_weight: float = 0.0) -> torch.Tensor:
    """pred (..., H, Q), y (..., H): mean over everything of max(tau e, (tau - 1) e), e = y - q;
    plus mse_weight * mean (y - q_0.5)^2 when mse_weight > 0."""
    tau = torch.as_tensor(quantiles, dtype=pred.dtype, device=pred.device)
    e = y.unsqueeze(-1) - pred
    loss = torch.maximum(tau * e, (tau - 1) * e).mean()
    if mse_weight:
        loss = loss + mse_weight * e[..., list(quantiles).index(0.5)].pow(2).mean()
    return loss


def quantile_shifts(q: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor,
                    quantiles) -> torch.Tensor:
    """q (N, H, Q) forecasts of N held-out windows, y (N, H) their truth, sigma (N, 1) their
    scales -> (Q,) shifts s_tau = the tau-quantile of (y - q_tau) / sigma over windows and
    steps; 0 at the median, which stays the point forecast."""
    r = ((y.unsqueeze(-1) - q) / sigma.unsqueeze(-1)).flatten(0, 1).double().numpy()  # (N H, Q)
    return torch.tensor([0.0 if tau == 0.5 else float(np.quantile(r[:, k], tau))
                         for k, tau in enumerate(quantiles)])


# ---- the model ----------------------------------------------------------------------------

class PatchForecaster(nn.Module):
    """RevIN -> patches -> linear + learned positions -> bidirectional trunk -> flatten head."""

    def __init__(self, cfg: ModelConfig, *, lookback: int, horizon: int, patch_len: int,
                 stride: int, n_quantiles: int, revin: bool = True, head_dropout: float = 0.0):
        super().__init__()
        self.patch_len, self.stride, self.revin = patch_len, stride, revin
        self.horizon, self.n_quantiles = horizon, n_quantiles
        n = (lookback - patch_len) // stride + 2
        d = cfg.d_model
        self.patch_emb = nn.Linear(patch_len, d)
        self.pos_emb = nn.Parameter(torch.zeros(1, n, d))
        self.trunk = Transformer(cfg)
        self.head_dropout = nn.Dropout(head_dropout)
        self.head = nn.Linear(n * d, horizon * n_quantiles)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, L) look-back windows, one channel each -> (B, H, Q) quantile forecasts."""
        q, mu, sigma = self.normalised(x)
        return q * sigma[..., None] + mu[..., None]

    def normalised(self, x: torch.Tensor):
        """The forecasts in each window's RevIN units, and the window's mu and sigma (0 and 1
        without RevIN)."""
        if self.revin:
            x, mu, sigma = revin(x)
        else:
            mu, sigma = x.new_zeros(x.size(0), 1), x.new_ones(x.size(0), 1)
        z = self.patch_emb(patchify(x, self.patch_len, self.stride)) + self.pos_emb
        z = self.trunk(z, causal=False)
        q = self.head(self.head_dropout(z.flatten(1))).view(-1, self.horizon, self.n_quantiles)
        return q.sort(dim=-1).values, mu, sigma


# ---- the task -----------------------------------------------------------------------------

@register
class SeriesTask(TaskBase):
    """Forecasting: a patch Transformer over each channel's look-back window, quantile head."""

    name = "series"
    Config = SeriesConfig
    what = "history CSV"
    suffixes = (".csv",)
    routes = ("forecasts",)

    @property
    def inference_rows(self) -> int:
        """A series' look-back is its patches at once."""
        return self.config.n_patches
    picture = "forecast.png"

    @property
    def best_metric(self) -> tuple[str, str]:
        """MSE in standardised units; MASE when the series are not scaled (it is scale-free)."""
        return ("val_mse" if self.config.scale else "val_mase", "min")

    def __init__(self, config: SeriesConfig):
        self.config = config
        self._data: SeriesData | None = None
        self._shifts: tuple = (None, None)  # (model, its calibration shifts)

    @classmethod
    def prepare(cls, config: SeriesConfig, model_cfg: ModelConfig, data: str | None = None):
        """Read the series and fix their names and training scaling in the config."""
        if data is not None:
            config = dataclasses.replace(config, data=str(find_data(config.data, data)))
        task = cls(config)
        d = task.data()  # also fixes the horizon and the season the data declares
        task.config = dataclasses.replace(task.config, columns=d.names, mean=d.mean, std=d.std)
        return task, _model_config(task.config, model_cfg)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        c = self.config
        model = PatchForecaster(_model_config(c, cfg), lookback=c.lookback, horizon=c.horizon,
                                patch_len=c.patch_len, stride=c.stride,
                                n_quantiles=len(c.quantiles), revin=c.revin,
                                head_dropout=c.head_dropout)
        init_weights(model, cfg.n_layer, scaled_residuals=False)
        return model

    # ---- data -------------------------------------------------------------------------------
    def _path(self) -> Path | None:
        c = self.config
        if c.data in BUILTIN:
            return find_data(BUILTIN[c.data]) if BUILTIN[c.data] else None
        return find_data(c.data)

    def data(self) -> SeriesData:
        """The series (series_io.load_series); a horizon or season left 0 in the config is
        set to what the data declares."""
        if self._data is None:
            self._data = d = load_series(self.config, self._path())
            if (self.config.horizon, self.config.season) != (d.horizon, d.season):
                self.config = dataclasses.replace(self.config, horizon=d.horizon,
                                                  season=d.season)
        return self._data

    def windows(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(look-back (B, L), future (B, H)) of the windows at `index` rows (series, start)."""
        c, d = self.config, self.data()
        t = (d.offsets[index[:, 0]] + index[:, 1])[:, None] + torch.arange(c.lookback + c.horizon)
        w = d.flat[t]
        return w[:, :c.lookback], w[:, c.lookback:]

    def batches(self, split: str, rng: torch.Generator, batch_size: int
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Windows (series, start) drawn uniformly with replacement from the split."""
        c = self.config
        index = window_index(self.data(), split, c.lookback, c.horizon)
        while True:
            yield self.windows(index[torch.randint(len(index), (batch_size,), generator=rng)])

    def loss(self, model, batch) -> torch.Tensor:
        """The pinball loss in model units, or, for unscaled data (series of every size, as
        M4's), in each window's RevIN units, so that large series do not drown small ones."""
        x, y = batch
        c = self.config
        if c.scale:
            return pinball_loss(model(x), y, c.quantiles, c.mse_weight)
        q, mu, sigma = model.normalised(x)
        return pinball_loss(q, (y - mu) / sigma, c.quantiles, c.mse_weight)

    def tokens(self, batch) -> int:
        return batch[0].size(0) * self.config.n_patches

    # ---- metrics ----------------------------------------------------------------------------
    @torch.no_grad()
    def forecast_split(self, model, split: str, progress: bool = False,
                       limit: int | None = None):
        """Every window of the split (or `limit` of them, evenly spaced): its index (N, 2),
        look-back (N, L), quantile forecasts (N, H, Q) and truth (N, H), in model units."""
        c = self.config
        device = next(model.parameters()).device
        index = window_index(self.data(), split, c.lookback, c.horizon)
        if limit is not None and len(index) > limit:
            index = index[torch.linspace(0, len(index) - 1, limit).long()]
        xs, preds, truth = [], [], []
        for i in tqdm(range(0, len(index), c.eval_batch_size), disable=not progress,
                      desc="eval", unit="batch"):
            x, y = self.windows(index[i:i + c.eval_batch_size])
            preds.append(model(x.to(device)).float().cpu())
            xs.append(x)
            truth.append(y)
        return index, torch.cat(xs), torch.cat(preds), torch.cat(truth)

    def metrics(self, index, q: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        """Of the median: MSE and MAE (model units), MASE and sMAPE (the data's own units);
        the pinball loss; and how often the truth falls between the outermost quantiles (the
        80 % interval for 0.1 and 0.9)."""
        qs = self.config.quantiles
        med = q[..., qs.index(0.5)]
        inside = ((y >= q[..., 0]) & (y <= q[..., -1])).float().mean()
        return {"mse": ((med - y) ** 2).mean().item(), "mae": (med - y).abs().mean().item(),
                "mase": mase(med, y, self.naive_scale(index)).item(),
                "smape": smape(*self.unscale(index, med, y)).item(),
                "pinball": pinball_loss(q, y, qs).item(), "coverage": inside.item()}

    def naive_scale(self, index: torch.Tensor) -> torch.Tensor:
        """MASE's denominator for each window's series: mean |x_t - x_(t-m)| over all that
        precedes its test part, its front padding left out (M4's in-sample scale), m =
        season; m = 1 for a history no longer than a season."""
        d, m = self.data(), self.config.season
        pads = d.pads or (0,) * len(d.values)
        scales = []
        for v, b, p in zip(d.values, d.borders, pads):
            h = v[p:b[1]]
            lag = m if len(h) > m else 1
            scales.append((h[lag:] - h[:-lag]).abs().mean() if len(h) > lag else h.new_zeros(()))
        return torch.stack(scales)[index[:, 0]].clamp_min(1e-8)

    def _stats(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        d = self.data()
        if not d.mean:
            return torch.zeros(len(index), 1, dtype=torch.float64), \
                torch.ones(len(index), 1, dtype=torch.float64)
        return (torch.tensor(d.mean, dtype=torch.float64)[index[:, 0], None],
                torch.tensor(d.std, dtype=torch.float64)[index[:, 0], None])

    def unscale(self, index: torch.Tensor, *xs: torch.Tensor) -> list[torch.Tensor]:
        """Values of the windows at `index` in model units -> the data's own units."""
        mean, std = self._stats(index)
        return [x.double() * std + mean for x in xs]

    def scale(self, index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The data's own units -> model units (config.scale's standardisation, or none)."""
        mean, std = self._stats(index)
        return (x.double() - mean) / std

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 1) scales of look-back windows x (N, L): their RevIN std, or 1 without RevIN."""
        return revin(x)[2] if self.config.revin else x.new_ones(x.size(0), 1)

    def calibrated(self, q: torch.Tensor, x: torch.Tensor, shifts: torch.Tensor | None):
        """Forecasts q (N, H, Q) from windows x (N, L) with each level shifted by its
        validation miss, sorted again; unchanged when `shifts` is None."""
        if shifts is None:
            return q
        return (q + shifts * self.sigma(x).unsqueeze(-1)).sort(dim=-1).values

    def shifts(self, model) -> torch.Tensor | None:
        """The calibration shifts of this model, computed once from (at most 2048 evenly
        spaced) validation windows; None when calibration is off or the training data is not
        at hand."""
        if not self.config.calibrate:
            return None
        if self._shifts[0] is not model:
            try:
                _, x, q, y = self.forecast_split(model, "val", limit=2048)
                value = quantile_shifts(q, y, self.sigma(x), self.config.quantiles)
            except DataError as e:
                warnings.warn(f"intervals not calibrated: {e}", stacklevel=2)
                value = None
            self._shifts = (model, value)
        return self._shifts[1]

    def evaluate(self, model, progress: bool = False) -> dict[str, float | int]:
        """The metrics on the validation windows (which pick the best checkpoint) and on the
        test windows; MSE and MAE in the standardised units the published figures use. The
        validation windows calibrate the test windows' quantiles (their own figures are
        before calibration)."""
        return self._evaluate(model, progress)[0]

    def _evaluate(self, model, progress: bool):
        """evaluate()'s figures, and the test split's forecasts for report() to reuse."""
        out: dict[str, float | int] = {}
        shifts = None
        for split in ("val", "test"):
            index, x, q, y = self.forecast_split(model, split, progress)
            if split == "val" and self.config.calibrate:
                shifts = quantile_shifts(q, y, self.sigma(x), self.config.quantiles)
            elif split == "test":
                q = self.calibrated(q, x, shifts)
            out.update({f"{split}_{k}": v for k, v in self.metrics(index, q, y).items()})
            out[f"{split}_windows"] = len(q)
        return out, (index, x, y)

    def report(self, model, run_dir: Path, *, data: str | None = None,
               backtest: int | None = None, progress: bool = False) -> dict:
        """evaluate(), with the naive, seasonal naive and Naive2 forecasts of the same test
        windows; or, with `backtest`, a rolling-origin comparison with the statistical
        forecasters (series_eval.py)."""
        if data is not None:
            raise DataError("`eval --data` is not supported for series runs; use `predict` on "
                            "a history CSV, or train on the data")
        if backtest is not None:
            return self.backtest(model, backtest, progress=progress)
        return with_baselines(self, model, progress)

    def backtest(self, model, k: int, methods=("naive", "seasonal_naive", "ets"),
                 progress: bool = False) -> dict:
        """A rolling-origin comparison from k origins per series with the statistical
        `methods` (series_eval.rolling_backtest)."""
        return rolling_backtest(self, model, k, methods, progress=progress)

    # ---- using the model --------------------------------------------------------------------
    @torch.no_grad()
    def forecast(self, model, history: torch.Tensor, horizon: int) -> torch.Tensor:
        """history (C, T >= lookback) in the model's units -> (C, horizon, Q). Beyond the
        model's own horizon the median is appended to the history and the model forecasts
        again from there (recursive forecasting). The quantiles are calibrated (shifts())."""
        c = self.config
        device = next(model.parameters()).device
        x, out, made = history[:, -c.lookback:].float(), [], 0
        shifts = self.shifts(model)
        while made < horizon:
            q = model(x.to(device)).float().cpu()
            out.append(self.calibrated(q, x, shifts))
            made += c.horizon
            x = torch.cat([x, q[..., c.quantiles.index(0.5)]], dim=1)[:, -c.lookback:]
        return torch.cat(out, dim=1)[:, :horizon]

    def read(self, source) -> History:
        """A history to forecast from (series_io.read_history): a CSV file, its bytes, or JSON
        {"csv": text} or {"series": {name: values}, "timestamps": [...]}."""
        return read_history(source, self.config)

    def _history_tensor(self, history: History) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
        """The last `lookback` values of each series in model units (S, L), and the scaling
        back to the data's units: mean (S,) and std (S,)."""
        c = self.config
        names = list(history.values)
        known = {n: i for i, n in enumerate(c.columns)}
        mean = np.array([c.mean[known[n]] if c.scale and n in known else 0.0 for n in names])
        std = np.array([c.std[known[n]] if c.scale and n in known else 1.0 for n in names])
        raw = np.stack([history.values[n][-c.lookback:] for n in names])
        x = torch.from_numpy(((raw - mean[:, None]) / std[:, None]).astype(np.float32))
        return x, mean, std

    def predict(self, model, items: list[History], *, horizon: int | None = None,
                plot: str | Path | None = None, progress: bool = False) -> list[dict]:
        """Forecast every series of each history `horizon` steps past its end: the run's
        quantiles (10/50/90 %) per step and series, timestamps continued at the series'
        frequency: {"series", "horizon", "quantiles", "forecast": [{"timestamp", "series",
        "forecast", "q10", ...}]}; and a PNG of the history, the median and the band at
        `plot` (several histories: plot-1.png, plot-2.png, ...). DataError for a horizon
        past MAX_HORIZON, a forecast of more than MAX_FORECAST_VALUES rows, and a history
        whose values make the forecast not finite (too large for the model's float32)."""
        c = self.config
        horizon = c.horizon if horizon is None else horizon
        if not 0 < horizon <= MAX_HORIZON:
            raise DataError(f"horizon {horizon} is invalid: give a positive number of steps, "
                            f"at most {MAX_HORIZON}")
        for history in items:
            if len(history.values) * horizon > MAX_FORECAST_VALUES:
                raise DataError(f"{len(history.values)} series x horizon {horizon} is "
                                f"{len(history.values) * horizon:,} forecasts, more than the "
                                f"{MAX_FORECAST_VALUES:,} one history may ask for; forecast "
                                f"at most {MAX_FORECAST_VALUES // len(history.values):,} "
                                "steps, or fewer series")
        labels = [f"q{round(t * 100):02d}" if round(t * 100, 6) == round(t * 100) else f"q{t:g}"
                  for t in c.quantiles]
        median = c.quantiles.index(0.5)
        out = []
        for k, history in enumerate(items):
            x, mean, std = self._history_tensor(history)
            q = self.forecast(model, x, horizon).double().numpy()
            q = q * std[:, None, None] + mean[:, None, None]  # (S, horizon, Q), the data's units
            bad = ~np.isfinite(q).reshape(len(q), -1).all(axis=1)
            if bad.any():  # e.g. RevIN's variance past float32 (values ~1e19 in model units)
                name = list(history.values)[int(bad.argmax())]
                raise DataError(f"the forecast of series {name!r} is not finite: its history "
                                "holds values too large for this model (or inf/nan); rescale "
                                "it to ordinary numbers")
            forecast, panels = [], []
            for i, name in enumerate(history.values):
                future, x_hist, x_future = continue_times(history.stamps[name], horizon)
                forecast += [{"timestamp": future[h], "series": name,
                              "forecast": float(q[i, h, median]),
                              **{label: float(q[i, h, j]) for j, label in enumerate(labels)}}
                             for h in range(horizon)]
                shown = min(len(x_hist), max(c.lookback, 3 * horizon))
                panels.append((name, x_hist[-shown:], history.table[name][-shown:], x_future,
                               q[i]))
            result = {"series": list(history.values), "horizon": horizon,
                      "quantiles": list(c.quantiles), "forecast": forecast}
            if plot is not None:
                from ..train.plots import plot_forecast
                where = Path(plot)
                if len(items) > 1:
                    where = where.with_name(f"{where.stem}-{k + 1}{where.suffix}")
                result["plot"] = str(plot_forecast(where, panels, c.quantiles))
            out.append(result)
        return out

    def summarize(self, results: list[dict], sources: list, skipped: list[dict]) -> dict:
        """One history: its forecast, with the file it came from ("history"); several: the
        forecasts under "predictions", and the files skipped."""
        rows = [{"history": str(s), **r} if isinstance(s, Path) else r
                for s, r in zip(sources, results)]
        if len(rows) == 1 and not skipped:
            return rows[0]
        return {"predictions": rows, "skipped": skipped}

    def format_predictions(self, summary: dict, fmt: str = "text") -> str:
        return format_forecasts(summary)

    def rows(self, summary: dict) -> tuple[list[str], list[list]]:
        return forecast_rows(summary)

    def format_report(self, figures: dict) -> str:
        """A backtest's table (one row per method), or the default figure per line."""
        return format_backtest(figures) if "methods" in figures else \
            super().format_report(figures)

    # ---- explaining ---------------------------------------------------------------------------
    def example_inputs(self, model_cfg, batch: int, length: int | None):
        return (torch.randn(batch, self.config.lookback),), model_cfg.context

    def attention_inputs(self, history: History) -> tuple:
        return (self._history_tensor(history)[0][:1],)  # the first series

    def draw_attention(self, history, weights, outputs, title, *, top_k: int = 5):
        """How much each patch of the first series' look-back is attended to, over all
        queries, under the series."""
        from ..train.plots import figure
        c = self.config
        name = next(iter(history.values))
        window = history.values[name][-c.lookback:]
        received = weights.mean(0)
        starts = [i * c.stride for i in range(received.numel())]
        fig, axes = figure(9, 5, rows=2, sharex=True, gridspec_kw={"height_ratios": [2, 1]})
        axes[0].plot(range(c.lookback), window, color="tab:blue")
        axes[0].set_title(f"{name}: the last {c.lookback} values", fontsize=9)
        axes[1].bar([s + c.patch_len / 2 for s in starts], received.numpy(),
                    width=c.stride * 0.9, color="tab:orange")
        axes[1].set_xlabel("step of the look-back (patch centres)")
        axes[1].set_ylabel("attention")
        axes[1].set_title(f"{title}: attention each patch receives", fontsize=9)
        return fig, {"series": name, "patch_starts": starts,
                     "attention_received": received.tolist()}


def _model_config(config: SeriesConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The trunk of a forecaster: no vocabulary, no position table (learned positions are
    added to the patch tokens), a context of the number of patches."""
    if model_cfg.positions == "rope":
        raise ConfigError("positions='rope' is invalid for series: the patch embedding adds "
                          "learned positions; leave positions=none")
    return model_cfg.replace(context=config.n_patches, vocab_size=0, positions="none")
