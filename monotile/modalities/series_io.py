"""Reading series: CSV files (wide or long), gaps, timestamps, the built-in data sets, and
the windows of each split.

Gaps:      a missing value is the linear interpolation between its nearest known neighbours;
           before the first or after the last known value, that value is carried (pandas'
           interpolate(limit_direction="both"))
Columns:   the header is the first line; blank lines before it are skipped, unless the row after
           them holds only numbers (then the blank line was the header of unnamed columns). An
           empty header cell, or a row wider than the header, names its column as pandas does,
           "Unnamed: i" (i counted from 0); an unnamed column with no values (trailing commas)
           is dropped; a name given twice is refused
Limits:    a CSV of at most MAX_CSV_BYTES (256 MiB) and MAX_CSV_CELLS (25 million cells) is
           read: past either, a DataError before the rest is read
Splits:    each series in time order: [0, train_end) trains, [train_end, val_end) validates,
           [val_end, end) tests; a window of the validation or test split looks back into the
           part before it (Informer's and PatchTST's convention)
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DataError

if TYPE_CHECKING:
    from .series import SeriesConfig

# name -> (file under the data root, rows of train, validation and test in time order)
BUILTIN = {"etth1": ("ett/ETTh1.csv", (12 * 30 * 24, 4 * 30 * 24, 4 * 30 * 24)),
           "m4-weekly": ("m4/Weekly-train.csv", None),
           "co2": (None, None), "sunspots": (None, None)}  # inside statsmodels' package
MAX_CSV_BYTES = 256 * 2 ** 20  # the largest CSV read (ETTh1: 2.6 MB)
MAX_CSV_CELLS = 25_000_000     # cells over all its rows (traffic, 862 x 17,544: 15 million)
NA = ("", "NA", "NaN", "nan", "null")  # cells read as a gap


@dataclass
class SeriesData:
    """Series, each with where its training, validation and test rows end."""
    values: list[torch.Tensor]          # one 1-D float32 tensor per series, scaled (config.scale)
    names: tuple[str, ...]
    times: list[list[str]]              # each series' timestamps
    borders: list[tuple[int, int, int]]  # train_end, val_end, end (rows) of each series
    mean: tuple[float, ...] = ()        # the scaling applied (empty when config.scale is off)
    std: tuple[float, ...] = ()

    def __post_init__(self):
        self.flat = torch.cat(self.values)
        self.offsets = torch.tensor([0] + [len(v) for v in self.values[:-1]]).cumsum(0)


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


def read_table(source: Path | str, config: SeriesConfig
               ) -> tuple[list[str], dict[str, np.ndarray], dict[str, list[str]]]:
    """A CSV with a header, a file or its text -> (the time column's strings, {series: float
    values}, {series: its times}). Wide: one column per series and a time column; long:
    columns id, timestamp, value (or unique_id, ds, y), one series per id. Empty cells are
    NaN. DataError for an empty file, one past the limits, one with no numeric column, an
    unknown or a non-numeric target column."""
    if isinstance(source, str):
        return table_from_rows(_csv_rows(_bounded(source, "the CSV text"), "the CSV text"),
                               config, "the CSV text")
    try:
        _bounded(os.path.getsize(source), source)
        with open(source, newline="", encoding="utf-8-sig") as f:
            rows = _csv_rows(f, source)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {source} as a CSV file ({e}); give a UTF-8 CSV with a "
                        "header row") from None
    return table_from_rows(rows, config, source)


def _bounded(text: str | int, where):
    """The CSV text (or a file's size in bytes) if within MAX_CSV_BYTES, else DataError."""
    size = text if isinstance(text, int) else len(text)
    if size > MAX_CSV_BYTES:
        raise DataError(f"{where} is {size / 2 ** 20:,.0f} MiB, more than the "
                        f"{MAX_CSV_BYTES // 2 ** 20} MiB this reads; give fewer rows (a "
                        "forecast reads only the last lookback of them) or fewer columns")
    return text


def _csv_rows(source, where) -> list[list[str]]:
    """The rows of a CSV (text or an open file), stopping with a DataError past
    MAX_CSV_CELLS cells."""
    rows, cells = [], 0
    try:
        for row in csv.reader(io.StringIO(source) if isinstance(source, str) else source):
            cells += max(len(row), 1)
            if cells > MAX_CSV_CELLS:
                raise DataError(f"{where} holds more than {MAX_CSV_CELLS:,} cells, more than "
                                "this reads; give fewer rows (a forecast reads only the last "
                                "lookback of them) or fewer columns")
            rows.append(row)
    except csv.Error as e:
        raise DataError(f"{where} is not a readable CSV ({e}); give a UTF-8 CSV with a header "
                        "row") from None
    return rows


def _columns_of(rows: list[list[str]], path) -> tuple[list[str], dict[str, list[str]], int]:
    """The header's names, {name: the column's stripped cells} and the number of data rows
    (module docstring, Columns)."""
    def blank_line(r):
        return len(r) <= 1 and not "".join(r).strip()

    start = next((i for i, r in enumerate(rows) if not blank_line(r)), len(rows))
    if 0 < start < len(rows) and _numbers(rows[start]):
        start -= 1  # a blank header line above a row of numbers: unnamed columns
    body = [r for r in rows[start + 1:] if any(cell.strip() for cell in r)]
    if start >= len(rows) or not body:
        raise DataError(f"{path} has no data rows; give a CSV with a header and one row per "
                        "time step")
    header = [h.strip() for h in rows[start]]
    width = max(len(header), max(len(r) for r in body))
    names, cols, where = [], {}, {}
    for i in range(width):
        name = header[i] if i < len(header) else ""
        cells = [r[i].strip() if i < len(r) else "" for r in body]
        if not name:
            if not any(cells):  # trailing commas: nothing to name
                continue
            name = f"Unnamed: {i}"
        if name in where:
            raise DataError(f"column {name!r} appears twice in the header of {path} (columns "
                            f"{where[name] + 1} and {i + 1}); give each column its own name")
        where[name] = i
        names.append(name)
        cols[name] = cells
    return names, cols, len(body)


def table_from_rows(rows: list[list[str]], config: SeriesConfig, path
                    ) -> tuple[list[str], dict[str, np.ndarray], dict[str, list[str]]]:
    """read_table on the rows of a CSV; `path` names it in errors."""
    header, cols, n_rows = _columns_of(rows, path)
    long = _long_columns(header)
    if long is not None:
        return _read_long(path, config, cols, *long)

    time_col = config.time_col
    if time_col and time_col not in cols:
        raise DataError(f"time column {time_col!r} is not in {path}; its columns are "
                        f"{', '.join(header)}")
    if not time_col and _numeric(cols[header[0]])[0] is None:
        time_col = header[0]
    times = cols[time_col] if time_col else [str(i) for i in range(n_rows)]
    targets = list(config.target) or [h for h in header if h != time_col]
    if not targets:
        hint = (f" (it reads as one column {header[0]!r}: separate its columns with commas)"
                if len(header) == 1 and any(d in header[0] for d in ";\t|") else
                f" (its columns, {', '.join(header)}, hold text or dates)")
        raise DataError(f"{path} has no numeric column{hint}; a forecast file needs a header "
                        "row and a column of numbers per series, after an optional time "
                        "column (date,sales / 2024-01-01,12.5)")
    values = {}
    for name in targets:
        if name not in cols:
            raise DataError(f"column {name!r} is not in {path}; its columns are "
                            f"{', '.join(header)}")
        v, bad_row = _numeric(cols[name])
        if v is None:
            raise DataError(f"column {name!r} of {path} is not numeric (row {bad_row + 2}: "
                            f"{cols[name][bad_row]!r}); choose numeric columns with --target")
        values[name] = v
    return times, values, {name: times for name in values}


def _numeric(cells: list[str]) -> tuple[np.ndarray | None, int | None]:
    out = np.empty(len(cells))
    for i, cell in enumerate(cells):
        try:
            out[i] = float(cell) if cell not in NA else np.nan
        except ValueError:
            return None, i
    return out, None


def _numbers(row: list[str]) -> bool:
    """Whether a row holds only numbers (and gaps), at least one."""
    v, _ = _numeric([c.strip() for c in row])
    return v is not None and not np.isnan(v).all()


def _long_columns(header: list[str]) -> tuple[str, str, str] | None:
    """The (id, time, value) columns of a long-format header, or None."""
    lower = {h.lower(): h for h in header}
    for names in (("id", "timestamp", "value"), ("unique_id", "ds", "y"),
                  ("series", "time", "value"), ("id", "date", "value"), ("id", "time", "value")):
        if len(header) == 3 and all(n in lower for n in names):
            return tuple(lower[n] for n in names)
    return None


def _read_long(path, config, cols, id_col, time_col, value_col):
    values, bad_row = _numeric(cols[value_col])
    if values is None:
        raise DataError(f"column {value_col!r} of {path} is not numeric (row {bad_row + 2}: "
                        f"{cols[value_col][bad_row]!r}); give numbers in it")
    ids: dict[str, list[int]] = {}
    for i, sid in enumerate(cols[id_col]):
        ids.setdefault(sid, []).append(i)
    wanted = list(config.target) or list(ids)
    missing = [t for t in wanted if t not in ids]
    if missing:
        raise DataError(f"series {missing[0]!r} is not in {path}; its ids are "
                        f"{', '.join(list(ids)[:10])}{' ...' if len(ids) > 10 else ''}")
    keys = _time_keys(cols[time_col], config.date_format, path, time_col)
    table, times = {}, {}
    for sid in wanted:
        rows = ids[sid]
        order = sorted(rows, key=lambda i: keys[i])
        table[sid] = values[order]
        times[sid] = [cols[time_col][i] for i in order]
    return next(iter(times.values())), table, times


def _time_keys(cells: list[str], date_format: str, path, column: str) -> list:
    """What orders a long CSV's rows in time: the numbers where every cell is one (a step
    index), else the dates as pandas.to_datetime reads them (with `date_format`, exactly that
    format). A cell that is neither is refused: ordering by text would put 1/10/2024 before
    1/2/2024."""
    numbers, _ = _numeric(cells)
    if numbers is not None and not np.isnan(numbers).any():
        return numbers.tolist()
    import pandas as pd
    fmt = date_format or "mixed"
    try:
        stamps = pd.to_datetime(pd.Series(cells), format=fmt)
    except (ValueError, TypeError, OverflowError) as e:
        bad = next((i for i, c in enumerate(cells) if not _is_date(c, fmt)), 0)
        raise DataError(f"column {column!r} of {path} holds {cells[bad]!r} (row {bad + 2}), "
                        f"which is not a date{' in ' + date_format if date_format else ''} "
                        f"({e}); write its times as ISO dates (2024-01-03) or step numbers, "
                        "or say how they are written with --set date_format=%d/%m/%Y") \
            from None
    if stamps.isna().any():
        bad = int(stamps.isna().values.argmax())
        raise DataError(f"column {column!r} of {path} has no time in row {bad + 2}; give "
                        "every row its time")
    if getattr(stamps.dt, "tz", None) is not None:
        stamps = stamps.dt.tz_convert("UTC")
    return stamps.tolist()


def _is_date(cell: str, fmt: str) -> bool:
    import pandas as pd
    try:
        return not pd.isna(pd.to_datetime(cell, format=fmt))
    except (ValueError, TypeError, OverflowError):
        return False


def read_history(source, c: SeriesConfig) -> History:
    """A history to forecast from: a CSV file (wide or long, as training reads one), its
    bytes, or JSON: {"csv": text} or {"series": {name: values}, "timestamps": [...]}. With
    RevIN (c.revin) any series can be forecast; without it, only the run's own columns. Each
    series needs `lookback` values once its gaps are filled."""
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


def fill_missing(v: np.ndarray) -> np.ndarray:
    """NaNs filled by linear interpolation between the nearest known values; before the
    first or after the last known value, that value is carried (np.interp's rule)."""
    known = ~np.isnan(v)
    if known.all() or not known.any():
        return v
    idx = np.arange(len(v))
    return np.interp(idx, idx[known], v[known])


def check_times(times: list[str], where: str) -> None:
    """Warn about duplicate timestamps and steps that differ from the usual one (the series
    is used in row order either way)."""
    import pandas as pd
    try:
        t = pd.to_datetime(pd.Series(times), format="mixed")
    except (ValueError, TypeError, OverflowError):
        return
    if len(t) < 3 or t.isna().any():
        return
    dup = t.duplicated()
    if dup.any():
        warnings.warn(f"{where}: {int(dup.sum())} duplicate timestamps (the first: "
                      f"{times[int(dup.values.argmax())]}); rows are used in file order",
                      stacklevel=3)
    steps = t.diff().iloc[1:]
    usual = steps.mode().iloc[0]
    odd = (steps != usual) & (steps.dt.days < 28)  # months and years vary by nature
    if odd.any() and not dup.any():
        first = int(odd.values.argmax()) + 1
        warnings.warn(f"{where}: {int(odd.sum())} irregular steps (the usual step is {usual}; "
                      f"the first other one ends at {times[first]}); rows are used in order, "
                      "as if equally spaced", stacklevel=3)


def load_series(config: SeriesConfig, path: Path | None) -> SeriesData:
    """Read the series, fill gaps, split each in time order, scale with training stats."""
    where = path.name if path is not None else config.data
    if config.data == "m4-weekly":
        names, series, times, borders = _m4(config, path)
    else:
        if config.data in ("co2", "sunspots"):
            stamps, table = _statsmodels(config.data)
        else:
            _, table, stamps = read_table(path, config)
        names, series, times, borders = [], [], [], []
        checked: set[int] = set()
        for name, v in table.items():
            if np.isnan(v).all():
                raise DataError(f"series {name!r} of {where} has no values")
            if id(stamps[name]) not in checked:  # the columns of a wide CSV share one time axis
                checked.add(id(stamps[name]))
                check_times(stamps[name], f"{where} ({name})" if len(table) > 1 else where)
            T = len(v)
            if BUILTIN.get(config.data, (None, None))[1]:
                n_train, n_val, n_test = BUILTIN[config.data][1]
                b = (n_train, n_train + n_val, n_train + n_val + n_test)
            else:
                n_test = max(config.horizon, round(T * config.test_fraction))
                n_val = max(config.horizon, round(T * config.val_fraction))
                b = (T - n_test - n_val, T - n_test, T)
            if b[0] < config.lookback + config.horizon:
                raise DataError(f"series {name!r} of {where} has {T} rows: too few for lookback "
                                f"{config.lookback} + horizon {config.horizon} in its training "
                                f"part ({b[0]} rows); lower --set lookback or --horizon, or "
                                "give a longer series")
            names.append(name)
            series.append(fill_missing(v))
            times.append(stamps[name])
            borders.append(b)
    mean = std = ()
    if config.scale:
        if config.mean:  # a trained run: its own training statistics
            mean, std = tuple(config.mean), tuple(config.std)
        else:
            mean = tuple(float(v[:b[0]].mean()) for v, b in zip(series, borders))
            std = tuple(max(float(v[:b[0]].std()), 1e-8) for v, b in zip(series, borders))
        series = [(v - m) / s for v, m, s in zip(series, mean, std)]
    return SeriesData([torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in series],
                      tuple(names), times, borders, mean, std)


def _statsmodels(name: str) -> tuple[dict, dict]:
    """co2 (Mauna Loa, weekly, 1958-2001) or sunspots (yearly, 1700-2008) from statsmodels."""
    from statsmodels import datasets
    if name == "co2":
        frame = datasets.co2.load_pandas().data
        times = [t.strftime("%Y-%m-%d") for t in frame.index]
        return {"co2": times}, {"co2": frame["co2"].to_numpy(dtype=np.float64)}
    frame = datasets.sunspots.load_pandas().data
    times = [str(int(y)) for y in frame["YEAR"]]
    return ({"SUNACTIVITY": times},
            {"SUNACTIVITY": frame["SUNACTIVITY"].to_numpy(dtype=np.float64)})


def _m4(config: SeriesConfig, train_path: Path):
    """M4's weekly series: the history file, with the 13 test values of the other file
    appended; the last 13 of the history validate, the test values test. A series too short
    for one training window is padded at the front with its first value."""
    test_path = train_path.with_name(train_path.name.replace("-train", "-test"))
    hist = {r[0]: r[1:] for r in csv.reader(open(train_path, newline=""))}
    test = {r[0]: r[1:] for r in csv.reader(open(test_path, newline=""))}
    hist.pop("V1"), test.pop("V1")
    names, series, times, borders = [], [], [], []
    H = config.horizon
    for name, cells in hist.items():
        v = np.array([float(c) for c in cells if c.strip()] +
                     [float(c) for c in test[name] if c.strip()][:H])
        short = 2 * H + config.lookback - len(v)
        if short > 0:  # too short for one training window: pad the front with the first value
            v = np.concatenate([np.full(short, v[0]), v])
        n = len(v)
        names.append(name)
        series.append(v)
        times.append([str(i) for i in range(n)])
        borders.append((n - 2 * H, n - H, n))
    return names, series, times, borders


def window_index(data: SeriesData, split: str, lookback: int, horizon: int) -> torch.Tensor:
    """(series, start row) of every window whose forecast lies wholly in the split (stride 1),
    as in Informer and PatchTST: a validation or test window looks back into the part before
    it."""
    out = []
    for i, (train_end, val_end, end) in enumerate(data.borders):
        lo, hi = {"train": (0, train_end), "val": (train_end - lookback, val_end),
                  "test": (val_end - lookback, end)}[split]
        starts = torch.arange(lo, hi - lookback - horizon + 1)
        out.append(torch.stack([torch.full_like(starts, i), starts], dim=1))
    return torch.cat(out)


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
             f"{'method':>15}  {'MSE':>8}  {'MAE':>8}  {'MASE':>8}  {'sMAPE':>8}  coverage"]
    for name, m in figures["methods"].items():
        cover = f"{m['coverage']:8.1%}" if "coverage" in m else f"{'-':>8}"
        lines.append(f"{name:>15}  {m['mse']:8.4f}  {m['mae']:8.4f}  {m['mase']:8.4f}  "
                     f"{m['smape']:8.3f}  {cover}")
    return "\n".join(lines)
