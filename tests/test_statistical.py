"""The statistical baselines against independent references (statistical.py)."""

import warnings

import numpy as np
import pytest

from monotile.modalities.statistical import arima, forecast, naive, seasonal_naive


def airline_series(n: int, m: int, a: float = -0.5, s: float = -0.7, seed: int = 0):
    """(1 - B)(1 - B^m) y_t = (1 + a B)(1 + s B^m) e_t, with a level and a season to start."""
    rng = np.random.default_rng(seed)
    e = rng.normal(0, 1, n + m + 1)
    w = e[m + 1:] + a * e[m:-1] + s * e[1:-m] + a * s * e[:-m - 1]
    y = np.zeros(n)
    y[:m + 1] = 100 + 5 * np.sin(2 * np.pi * np.arange(m + 1) / m)
    for t in range(m + 1, n):
        y[t] = w[t] + y[t - 1] + y[t - m] - y[t - m - 1]
    return y


@pytest.mark.parametrize("n, m, h", [(180, 12, 30), (30, 12, 5), (120, 1, 8)])
def test_arima_matches_sarimax_with_the_differences_in_its_state(n, m, h):
    """The airline fit on the differenced series (one state per MA lag, the variance
    concentrated out) forecasts what statsmodels' SARIMAX with the differences kept in its
    state vector (its default, the older baseline) forecasts; 30 values are under 3 seasons,
    which leaves the plain (0,1,1)."""
    from statsmodels.tsa.statespace.sarimax import SARIMAX
    y = airline_series(n, m)
    seasonal = (0, 1, 1, m) if m > 1 and n >= 3 * m else (0, 0, 0, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = SARIMAX(y, order=(0, 1, 1), seasonal_order=seasonal).fit(disp=False).forecast(h)
        out = arima(y, h, m)
    assert out.shape == (h,)
    assert np.allclose(out, ref, rtol=0, atol=1e-3 * np.abs(y).std()), np.abs(out - ref).max()


def test_airline_forecast_follows_the_difference_equation_past_the_ma_lags():
    """Past m + 1 steps the MA terms are spent: y_(T+h) = y_(T+h-1) + y_(T+h-m) - y_(T+h-m-1),
    so the forecast keeps one season's shape and a straight-line trend."""
    m, h = 12, 40
    y = airline_series(240, m, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = np.concatenate([y, arima(y, h, m)])
    t = np.arange(len(y) + m + 1, len(f))
    assert np.allclose(f[t], f[t - 1] + f[t - m] - f[t - m - 1], atol=1e-8)
    assert not np.allclose(f[len(y):], seasonal_naive(y, h, m))  # it is not the trivial answer


def test_forecast_falls_back_to_naive_when_a_fit_fails():
    y = np.array([1.0, 2.0, 3.0])
    assert np.array_equal(forecast("naive", y, 4), naive(y, 4))
    assert np.isfinite(forecast("arima", y, 4, 12)).all()
