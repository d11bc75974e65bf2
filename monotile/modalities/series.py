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
import math
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
from .series_io import (BUILTIN, SeriesData, continue_times, fill_missing, load_series,
                        read_table, window_index)



@dataclass(frozen=True, kw_only=True)
class SeriesConfig:
    data: str = "etth1"           # etth1 | m4-weekly | co2 | sunspots | a CSV: one column per
                                  #   series and a time column (wide), or id,timestamp,value
                                  #   rows (long)
    target: tuple = ()            # the columns to forecast; () = every numeric column
    time_col: str = ""            # "" = the first column if it is not numeric
    lookback: int = 336           # L: values the model sees
    horizon: int = 96             # H: values it forecasts
    patch_len: int = 16           # P
    stride: int = 8               # S
    quantiles: tuple = (0.1, 0.5, 0.9)
    revin: bool = True            # normalise each window by its own mean and std
    scale: bool = True            # standardise each column by its training mean and std
    val_fraction: float = 0.2     # time-ordered splits of a CSV without fixed borders:
    test_fraction: float = 0.2    #   the last test_fraction is test, the val_fraction before it
    season: int = 1               # m of MASE's seasonal naive scale (24 for hourly data)
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

        check_positive(self, ("lookback", "horizon", "patch_len", "stride", "season",
                              "eval_batch_size"))
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


def mase(pred: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean over windows of mean_h |y_h - pred_h| / scale, scale = the in-sample mean absolute
    error of the seasonal naive forecast, mean_t |x_t - x_(t-m)| (Hyndman & Koehler 2006)."""
    return ((pred - y).abs().mean(-1) / scale).mean()


def smape(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of 200 |y - pred| / (|y| + |pred|) over steps and windows, in % (M4's sMAPE)."""
    return (200 * (y - pred).abs() / (y.abs() + pred.abs()).clamp_min(1e-8)).mean()


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

class SeriesTask:
    """Forecasting: a patch Transformer over each channel's look-back window, quantile head."""

    name = "series"
    Config = SeriesConfig

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
        d = task.data()
        task.config = dataclasses.replace(config, columns=d.names, mean=d.mean, std=d.std)
        return task, _model_config(task.config, model_cfg)

    @classmethod
    def load(cls, config: SeriesConfig, model_cfg: ModelConfig, run_dir: Path):
        return cls(config)

    def save(self, run_dir: Path) -> None:
        pass  # the series' names and scaling live in config.json

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
            return find_data(BUILTIN[c.data][0]) if BUILTIN[c.data][0] else None
        return find_data(c.data)

    def data(self) -> SeriesData:
        if self._data is None:
            self._data = load_series(self.config, self._path())
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
        precedes its test part (M4's in-sample scale), m = season."""
        d, m = self.data(), self.config.season
        scales = torch.stack([(v[m:b[1]] - v[:b[1] - m]).abs().mean()
                              for v, b in zip(d.values, d.borders)])
        return scales[index[:, 0]].clamp_min(1e-8)

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
        """evaluate(), with the naive and seasonal naive forecasts of the same test windows;
        or, with `backtest`, a rolling-origin comparison with the statistical forecasters."""
        if data is not None:
            raise DataError("`eval --data` is not supported for series runs; use `predict` on "
                            "a history CSV, or train on the data")
        if backtest is not None:
            return self.backtest(model, backtest, progress=progress)
        out, (index, x, y) = self._evaluate(model, progress)
        m = self.config.season
        for name, pred in (("naive", x[:, -1:].expand_as(y)),
                           ("seasonal_naive", _repeat_season(x, m, y.size(1)))):
            q = pred.unsqueeze(-1).expand(*pred.shape, len(self.config.quantiles))
            figures = self.metrics(index, q, y)
            out.update({f"{name}_{k}": v for k, v in figures.items()
                        if k in ("mse", "mae", "mase", "smape")})
        if len(index) <= 5000:  # M4's overall weighted average against its Naive2 benchmark
            from .statistical import naive2
            raw = self.unscale(index, x)[0].double().numpy()
            pred = torch.from_numpy(np.stack([naive2(r, y.size(1), m) for r in raw]))
            q = self.scale(index, pred).float().unsqueeze(-1).expand(
                *pred.shape, len(self.config.quantiles))
            figures = self.metrics(index, q, y)
            out["naive2_smape"], out["naive2_mase"] = figures["smape"], figures["mase"]
            out["owa"] = 0.5 * (out["test_smape"] / figures["smape"] +
                                out["test_mase"] / figures["mase"])
        return out

    def backtest(self, model, k: int, methods=("naive", "seasonal_naive", "ets"),
                 progress: bool = False) -> dict:
        """Rolling origin: each series is forecast from k origins H apart, the last one H
        before its end, all in its test part; the model from the look-back before each origin,
        the statistical methods fitted on everything before it (at most 4000 values). Per
        method: MSE and MAE (model units), MASE, sMAPE; the model's interval coverage."""
        from . import statistical
        c, d = self.config, self.data()
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
        x, y = self.windows(index)
        with torch.no_grad():
            q = model(x.to(next(model.parameters()).device)).float().cpu()
        results = {"model": self.metrics(index, self.calibrated(q, x, self.shifts(model)), y)}
        raw = [self.unscale(torch.tensor([[i, 0]]), v[None])[0][0].numpy()
               for i, v in enumerate(d.values)]
        for method in tqdm(methods, disable=not progress, desc="baselines", unit="method"):
            preds = []
            for i, start in index.tolist():
                origin = start + c.lookback
                preds.append(statistical.forecast(method, raw[i][max(0, origin - 4000):origin],
                                                  H, c.season))
            pred = torch.from_numpy(np.stack(preds))
            pred = self.scale(index, pred).float()
            qs = pred.unsqueeze(-1).expand(*pred.shape, len(c.quantiles))
            figures = self.metrics(index, qs, y)
            figures.pop("coverage"), figures.pop("pinball")
            results[method] = figures
        return {"origins": k, "windows": len(index), "horizon": H, "season": c.season,
                "methods": results}

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

    def predict(self, model, inputs: list, *, horizon: int | None = None,
                plot: str | Path | None = None, progress: bool = False) -> dict:
        """Forecast every series of a history CSV (wide or long) `horizon` steps past its end:
        the run's quantiles (10/50/90 %) per step and series, timestamps continued at the
        series' frequency, and a PNG of the history, the median and the band at `plot`.
        With RevIN any series can be forecast; without it, only the run's own columns."""
        c = self.config
        if len(inputs) != 1:
            raise DataError(f"give one history CSV, not {len(inputs)} files")
        path = Path(inputs[0]).expanduser()
        if not path.is_file():
            raise DataError(f"{path} does not exist; give a CSV of the history to forecast from")
        horizon = c.horizon if horizon is None else horizon
        if horizon <= 0:
            raise DataError(f"horizon {horizon} is invalid: give a positive number of steps")
        wanted = () if c.revin else c.columns
        _, table, stamps = read_table(path, dataclasses.replace(c, target=wanted))
        names, raw = list(table), []
        for name in names:
            v = fill_missing(table[name])
            if len(v) < c.lookback or np.isnan(v).any():
                raise DataError(f"series {name!r} of {path} has {np.isfinite(v).sum()} values; "
                                f"the model looks back {c.lookback}: give at least that many")
            raw.append(v[-c.lookback:])
        known = {n: i for i, n in enumerate(c.columns)}
        mean = np.array([c.mean[known[n]] if c.scale and n in known else 0.0 for n in names])
        std = np.array([c.std[known[n]] if c.scale and n in known else 1.0 for n in names])
        history = torch.from_numpy(((np.stack(raw) - mean[:, None]) / std[:, None])
                                   .astype(np.float32))
        q = self.forecast(model, history, horizon).double().numpy()
        q = q * std[:, None, None] + mean[:, None, None]  # (S, horizon, Q), in the CSV's units
        labels = [f"q{round(t * 100):02d}" if round(t * 100, 6) == round(t * 100) else f"q{t:g}"
                  for t in c.quantiles]
        median = c.quantiles.index(0.5)
        forecast, panels = [], []
        for i, name in enumerate(names):
            future, x_hist, x_future = continue_times(stamps[name], horizon)
            forecast += [{"timestamp": future[h], "series": name,
                          "forecast": float(q[i, h, median]),
                          **{label: float(q[i, h, k]) for k, label in enumerate(labels)}}
                         for h in range(horizon)]
            shown = min(len(x_hist), max(c.lookback, 3 * horizon))
            panels.append((name, x_hist[-shown:], table[name][-shown:], x_future, q[i]))
        out = {"history": str(path), "series": names, "horizon": horizon,
               "quantiles": list(c.quantiles), "forecast": forecast}
        if plot is not None:
            from ..train.plots import plot_forecast
            out["plot"] = str(plot_forecast(Path(plot), panels, c.quantiles))
        return out


def _repeat_season(x: torch.Tensor, m: int, h: int) -> torch.Tensor:
    """The seasonal naive forecast of windows x (N, L): their last m values repeated."""
    if m <= 1 or x.size(1) < m:
        return x[:, -1:].expand(-1, h)
    return x[:, -m:].repeat(1, math.ceil(h / m))[:, :h]


def _model_config(config: SeriesConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The trunk of a forecaster: no vocabulary, no position table (learned positions are
    added to the patch tokens), a context of the number of patches."""
    if model_cfg.positions == "rope":
        raise ConfigError("positions='rope' is invalid for series: the patch embedding adds "
                          "learned positions; leave positions=none")
    return model_cfg.replace(context=config.n_patches, vocab_size=0, positions="none")
