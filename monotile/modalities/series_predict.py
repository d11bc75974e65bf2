"""A forecast's way in and out: the history `predict` reads, the timestamps after it, the
table it prints and the CSV rows it writes, and a backtest's table.

History:    a CSV file (wide, long or one series per row, as training reads one), its bytes,
            or JSON: {"csv": text} or {"series": {name: values (null for a gap)},
            "timestamps": [...]}; gaps filled as in training (series_io.fill_missing)
Timestamps: the n after a history continue its frequency (pandas' inferred one, else the most
            common step); times that are numbers continue by their usual step, other text as
            +1, +2, ...
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import DataError
from .series_io import (MAX_CSV_CELLS, _bounded, _csv_rows, fill_missing, read_table,
                        table_from_rows)

if TYPE_CHECKING:
    from .series import SeriesConfig


@dataclass
class History:
    """The series of one history to forecast from, in the data's own units: as read (gaps
    are NaN), with the gaps filled, and each series' timestamps."""
    table: dict[str, np.ndarray]
    values: dict[str, np.ndarray]
    stamps: dict[str, list[str]]


def history_rows(obj: dict, time_col: str = "") -> list[list[str]]:
    """A history given as JSON, {"csv": CSV text} or {"series": {name: values (null for a
    gap)}, "timestamps": [...] (optional)}, as the rows of a CSV (the timestamps in a column
    named `time_col`, "date" if empty)."""
    if not isinstance(obj, dict) or ("csv" in obj) == ("series" in obj):
        raise DataError("give the history as {\"csv\": CSV text} or as {\"series\": {name: "
                        "values}}, one of the two")
    if "csv" in obj:
        if not isinstance(obj["csv"], str) or not obj["csv"].strip():
            raise DataError("csv is empty; give a header line and the values")
        return _csv_rows(_bounded(obj["csv"], "csv"), "csv")
    series, stamps = obj["series"], obj.get("timestamps")
    if not isinstance(series, dict) or not series or not all(
            isinstance(v, list) for v in series.values()):
        raise DataError("series is empty; give at least one {name: [values]}")
    lengths = {len(v) for v in series.values()}
    if len(lengths) != 1:
        raise DataError(f"the series have different lengths {sorted(lengths)}; give equally "
                        "long histories")
    n = lengths.pop()
    if stamps is not None and len(stamps) != n:
        raise DataError(f"timestamps has {len(stamps)} entries for {n} values")
    if n * len(series) > MAX_CSV_CELLS:
        raise DataError(f"series hold {n * len(series):,} values, more than the "
                        f"{MAX_CSV_CELLS:,} this reads; send fewer steps (a forecast reads the "
                        "last lookback) or fewer series")
    names = list(series)
    if not all(isinstance(k, str) and k.strip() for k in names):
        raise DataError("series has a series with an empty name; give each series a name")
    time_name = time_col or "date"
    if stamps and time_name in names:
        raise DataError(f"series has a series named {time_name!r}, the name of the timestamps' "
                        "column; rename it")
    rows = [([time_name] if stamps else []) + names]
    for t in range(n):
        try:
            cells = ["" if series[k][t] is None else repr(float(series[k][t])) for k in names]
        except (TypeError, ValueError):
            raise DataError(f"series hold a value that is not a number at step {t}; give "
                            "numbers (null for a gap)") from None
        rows.append(([str(stamps[t])] if stamps else []) + cells)
    return rows


def read_history(source, c: SeriesConfig) -> History:
    """A history to forecast from: a file (a wide or long CSV, one series per row or a .tsf,
    as training reads one; the run's layout setting holds), its bytes, or JSON: {"csv": text}
    or {"series": {name: values}, "timestamps": [...]}. With RevIN (c.revin) any series can be
    forecast; without it, only the run's own columns. Each series needs `lookback` values once
    its gaps are filled."""
    config = dataclasses.replace(c, target=() if c.revin else c.columns)
    if isinstance(source, dict):
        where = "the history"
        _, table, stamps = table_from_rows(history_rows(source, c.time_col), config, where)
    elif isinstance(source, (bytes, bytearray)):
        _bounded(len(source), "the upload")
        try:
            text = bytes(source).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise DataError("the upload is not a UTF-8 CSV; give a CSV with a header row "
                            "and one row per time step") from None
        where = "the upload"
        _, table, stamps = read_table(text, config)
    elif isinstance(source, (str, Path)):
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataError(f"{path} does not exist; give a CSV of the history to forecast "
                            "from")
        where = path
        _, table, stamps = read_table(path, config)
    else:
        raise DataError("give the history as a CSV file, its text as {\"csv\": ...}, or "
                        "{\"series\": {name: values}}")
    filled = {}
    for name, v in table.items():
        f = fill_missing(v)
        if len(f) < c.lookback or np.isnan(f).any():
            raise DataError(f"series {name!r} of {where} has {np.isfinite(v).sum()} values; "
                            f"the model looks back {c.lookback}: give at least that many")
        if not (np.isfinite(f).all() and np.abs(f).max() < 1e15):
            raise DataError(f"series {name!r} of {where} holds a value that is not finite or "
                            "is beyond 1e15; give the history in units where its values are "
                            "ordinary numbers")
        filled[name] = f
    return History(table, filled, stamps)


def continue_times(times: list[str], n: int) -> tuple[list[str], list, list]:
    """The n timestamps after `times`, at its frequency (pandas' inferred frequency, else the
    most common step), as strings; and x values for a plot of the history and the future
    (dates, or row numbers when the times are not dates)."""
    import pandas as pd
    try:
        t = pd.to_datetime(pd.Series(times), format="mixed")
        if t.isna().any() or len(t) < 2:
            raise ValueError("not dates")
    except (ValueError, TypeError, OverflowError):
        try:
            v = np.array([float(s) for s in times])
            step = float(pd.Series(np.diff(v[-100:])).mode().iloc[0]) if len(v) > 1 else 1.0
            fut = v[-1] + step * np.arange(1, n + 1)
            fmt = [f"{x:g}" for x in fut]
            return fmt, list(v), list(fut)
        except ValueError:
            return [f"+{i}" for i in range(1, n + 1)], list(range(len(times))), \
                list(range(len(times), len(times) + n))
    with warnings.catch_warnings():  # pandas 3 warns that infer_freq will return an offset
        warnings.simplefilter("ignore")
        freq = pd.infer_freq(t.iloc[-min(len(t), 100):]) if len(t) >= 3 else None
    if freq is not None:
        fut = pd.date_range(t.iloc[-1], periods=n + 1, freq=freq)[1:]
    else:
        step = t.diff().iloc[-100:].mode().iloc[0]
        fut = pd.DatetimeIndex([t.iloc[-1] + step * k for k in range(1, n + 1)])
    daily = (t.dt.normalize() == t).all() and (fut.normalize() == fut).all()
    fmt = fut.strftime("%Y-%m-%d" if daily else "%Y-%m-%d %H:%M:%S").tolist()
    return fmt, list(t), list(fut)


# ---- writing forecasts ---------------------------------------------------------------------

def _columns(result: dict) -> list[str]:
    first = result["forecast"][0]
    return ["timestamp", "series", "forecast", *[k for k in first if k.startswith("q")]]


def format_forecasts(summary: dict) -> str:
    """A table per history: timestamp, series, the median forecast and the quantiles."""
    parts = summary.get("predictions", [summary])
    out = []
    for r in parts:
        keys = _columns(r)
        if len(parts) > 1:
            out.append(f"==> {r.get('history', '')} <==")
        out.append("  ".join(f"{k:>19}" if k == "timestamp" else f"{k:>10}" for k in keys))
        out += ["  ".join(f"{row[k]:>19}" if k == "timestamp" else
                          f"{row[k]:>10}" if k == "series" else f"{row[k]:10.4g}"
                          for k in keys) for row in r["forecast"]]
    return "\n".join(out)


def forecast_rows(summary: dict) -> tuple[list[str], list[list]]:
    """timestamp, series, forecast and one column per quantile, a row per step."""
    parts = summary.get("predictions", [summary])
    keys = _columns(parts[0])
    return keys, [[row[k] if isinstance(row[k], str) else f"{row[k]:.6g}" for k in keys]
                  for r in parts for row in r["forecast"]]


def format_backtest(figures: dict) -> str:
    """A rolling-origin backtest's table: one row per method."""
    lines = [f"rolling-origin backtest: {figures['origins']} origins x "
             f"{figures['windows'] // figures['origins']} series, horizon "
             f"{figures['horizon']}, season {figures['season']}",
             *([f"split: {figures['split']}"] if figures.get("split") else []),
             f"{'method':>15}  {'MSE':>8}  {'MAE':>8}  {'MASE':>8}  {'sMAPE':>8}  coverage"]
    for name, m in figures["methods"].items():
        cover = f"{m['coverage']:8.1%}" if "coverage" in m else f"{'-':>8}"
        lines.append(f"{name:>15}  {m['mse']:8.4f}  {m['mae']:8.4f}  {m['mase']:8.4f}  "
                     f"{m['smape']:8.3f}  {cover}")
    return "\n".join(lines)
