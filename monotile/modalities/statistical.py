"""The statistical forecasters a learned one has to beat, fitted on the same history.

naive:           y_(T+h) = y_T
seasonal naive:  y_(T+h) = y_(T+h-m k), k = ceil(h / m)       (the value one season back)
naive2:          naive on the seasonally adjusted series, re-seasonalised (M4's benchmark;
                 classical multiplicative decomposition when the lag-m autocorrelation is
                 significant at 90 %, else plain naive)
ets:             exponential smoothing, additive damped trend, additive season of length m
                 when the history holds two seasons (statsmodels ExponentialSmoothing)
holt_winters:    the same with an undamped trend: level + h trend + season, the classic
                 additive Holt-Winters forecast
theta:           the Theta method (Assimakopoulos & Nikolopoulos 2000; statsmodels ThetaModel)
arima:           the airline model (0,1,1)(0,1,1)_m, or (0,1,1) without a season (statsmodels):
                 w_t = (1 - B)(1 - B^m) y_t = (1 + a B)(1 + A B^m) e_t, fitted by exact maximum
                 likelihood on w, forecast by y_t = w_t + y_(t-1) + y_(t-m) - y_(t-m-1)
"""

from __future__ import annotations

import math
import warnings

import numpy as np

METHODS = ("naive", "seasonal_naive", "naive2", "ets", "holt_winters", "theta", "arima")


def naive(y: np.ndarray, h: int) -> np.ndarray:
    return np.full(h, y[-1], dtype=np.float64)


def seasonal_naive(y: np.ndarray, h: int, m: int) -> np.ndarray:
    if m <= 1 or len(y) < m:
        return naive(y, h)
    season = y[-m:]
    return np.array([season[i % m] for i in range(h)], dtype=np.float64)


def seasonality_test(y: np.ndarray, m: int) -> bool:
    """M4's test: the lag-m autocorrelation exceeds 1.645 sqrt((1 + 2 sum_(k<m) r_k^2) / n)."""
    if m <= 1 or len(y) < 3 * m:
        return False
    x = y - y.mean()
    denom = (x * x).sum()
    if denom == 0:
        return False
    r = np.array([(x[k:] * x[:-k]).sum() / denom for k in range(1, m + 1)])
    limit = 1.645 * math.sqrt((1 + 2 * (r[:-1] ** 2).sum()) / len(y))
    return abs(r[-1]) > limit


def seasonal_indices(y: np.ndarray, m: int) -> np.ndarray:
    """Classical multiplicative decomposition: the mean ratio of y to its centred moving
    average at each position of the season, normalised to average 1."""
    if m % 2 == 0:
        w = np.r_[0.5, np.ones(m - 1), 0.5] / m
    else:
        w = np.ones(m) / m
    trend = np.convolve(y, w, mode="valid")
    offset = (len(w) - 1) // 2
    ratios = y[offset:offset + len(trend)] / trend
    idx = (np.arange(len(ratios)) + offset) % m
    s = np.array([ratios[idx == i].mean() for i in range(m)])
    return s / s.mean()


def naive2(y: np.ndarray, h: int, m: int) -> np.ndarray:
    if m > 1 and seasonality_test(y, m) and (y > 0).all():
        s = seasonal_indices(y, m)
        adjusted = y / s[np.arange(len(y)) % m]
        return adjusted[-1] * s[np.arange(len(y), len(y) + h) % m]
    return naive(y, h)


def ets(y: np.ndarray, h: int, m: int, damped: bool = True) -> np.ndarray:
    # fitted by least squares: statsmodels' ETSModel (maximum likelihood) stalls on long seasons
    # (MASE 1.06 on co2's last year, weekly, m = 52, against 0.37 for the same model here)
    from statsmodels.tsa.holtwinters import ExponentialSmoothing
    seasonal = "add" if m > 1 and len(y) >= 2 * m else None
    model = ExponentialSmoothing(y, trend="add", damped_trend=damped, seasonal=seasonal,
                                 seasonal_periods=m if seasonal else None)
    return np.asarray(model.fit().forecast(h), dtype=np.float64)


def holt_winters(y: np.ndarray, h: int, m: int) -> np.ndarray:
    return ets(y, h, m, damped=False)


def theta(y: np.ndarray, h: int, m: int) -> np.ndarray:
    from statsmodels.tsa.forecasting.theta import ThetaModel
    deseasonalize = m > 1 and len(y) >= 2 * m and (y > 0).all()
    model = ThetaModel(y, period=m if deseasonalize else 1, deseasonalize=deseasonalize)
    return np.asarray(model.fit().forecast(h), dtype=np.float64)


def arima(y: np.ndarray, h: int, m: int) -> np.ndarray:
    # the same likelihood as SARIMAX with the differences in its state, in a 54-state model for
    # m = 52 instead of 107, the variance concentrated out and no parameter covariance: 3 s a
    # fit on co2 where that took 36 s or more, the same forecast to 1e-5
    from statsmodels.tsa.statespace.sarimax import SARIMAX
    m = m if m > 1 and len(y) >= 3 * m else 0
    model = SARIMAX(y, order=(0, 1, 1), seasonal_order=(0, 1, 1, m) if m else (0, 0, 0, 0),
                    simple_differencing=True, concentrate_scale=True)
    w = model.fit(disp=False, cov_type="none").forecast(h)
    out = np.concatenate([y, np.zeros(h)])
    n = len(y)
    for k in range(h):  # undo the differences
        out[n + k] = w[k] + out[n + k - 1] + (out[n + k - m] - out[n + k - m - 1] if m else 0)
    return out[n:]


def forecast(method: str, y: np.ndarray, h: int, m: int = 1) -> np.ndarray:
    """h values after the history y by `method`; a model statsmodels cannot fit falls back to
    the naive forecast (and says so once)."""
    y = np.asarray(y, dtype=np.float64)
    if method == "naive":
        return naive(y, h)
    if method == "seasonal_naive":
        return seasonal_naive(y, h, m)
    if method == "naive2":
        return naive2(y, h, m)
    fit = {"ets": ets, "holt_winters": holt_winters, "theta": theta, "arima": arima}[method]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # statsmodels' convergence chatter
        try:
            out = fit(y, h, m)
        except (ValueError, np.linalg.LinAlgError, IndexError):
            out = None
    if out is None or not np.isfinite(out).all():
        return naive(y, h)
    return out
