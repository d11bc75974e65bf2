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
Layouts:   a wide or long CSV here; one series per row (M4's), Monash's .tsf, and which one a
           file is, in series_formats.py
Splits:    each series in time order: [0, train_end) trains, [train_end, val_end) validates,
           [val_end, end) tests; a window of the validation or test split looks back into the
           part before it (Informer's and PatchTST's convention). split=fraction: the last
           test_fraction tests, the val_fraction before it validates; horizon: the last H
           values test, the H before them validate (M4's and Monash's; with M4's test file
           its H values are appended and test); ett: Informer's borders (series_formats.py).
           split=auto: ett for a file of the ETT family, horizon for one series per row or a
           .tsf, else fraction. In the horizon split of rows and .tsf series, a series too
           short for one training window is padded at the front with its first value; the
           padding is no part of its history for MASE's scale or the statistical forecasts
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..errors import DataError
from .series_formats import (DEFAULT_HORIZON, M4, Declared, choose_split, csv_header,
                             horizon_and_season, layout_of, long_columns, m4_declared, read_rows,
                             read_tsf, split_note, text_layout, tsf_declared)

if TYPE_CHECKING:
    from .series import SeriesConfig

# name -> its file under the data root (None: inside statsmodels' package); the ETT family
# gets its split by its columns and length, M4's files theirs by the test file beside them
BUILTIN = {"etth1": "ett/ETTh1.csv",
           **{f"m4-{f}": f"m4/{f.capitalize()}-train.csv" for f in M4},
           "co2": None, "sunspots": None}
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
    horizon: int = DEFAULT_HORIZON      # H and the season of MASE, as config set them or the
    season: int = 1                     #   data declared them (horizon=0, season=0)
    split: str = "fraction"             # fraction | horizon | ett
    split_note: str = ""                # the split in words, for `monotile eval`
    pads: tuple[int, ...] = ()          # values padded at the front of each series (none: ())

    def __post_init__(self):
        self.flat = torch.cat(self.values)
        self.offsets = torch.tensor([0] + [len(v) for v in self.values[:-1]]).cumsum(0)


def read_table(source: Path | str, config: SeriesConfig, layout: str | None = None
               ) -> tuple[list[str], dict[str, np.ndarray], dict[str, list[str]]]:
    """A file or its text -> (the time column's strings, {series: float values}, {series:
    its times}). Wide: one column per series and a time column; long: columns id,
    timestamp, value (or unique_id, ds, y), one series per id; rows: one series per row;
    tsf: Monash's (series_formats.py). `layout` (default: config.layout, or what the content
    shows) says which. Empty cells are NaN; rows and .tsf series count their steps from 0.
    DataError for an empty file, one past the limits, one with no numeric column, an unknown
    or a non-numeric target column, a file that reads two ways."""
    if isinstance(source, str):
        _bounded(source, "the CSV text")
        layout = layout or config.layout
        if layout == "auto":
            layout = text_layout(source, "the CSV text")
        if layout == "tsf":
            return _steps(read_tsf(source, "the text", MAX_CSV_CELLS).values, config, "the text")
        rows = _csv_rows(source, "the CSV text")
        if layout == "rows":
            return _steps(read_rows(rows, "the CSV text", MAX_CSV_CELLS), config, "the CSV text")
        return table_from_rows(rows, config, "the CSV text", layout)
    try:
        size = os.path.getsize(source)
    except OSError as e:
        raise DataError(f"cannot read {source} as a CSV file ({e}); give a UTF-8 CSV with a "
                        "header row") from None
    _bounded(size, source)
    layout = layout or layout_of(Path(source), config)
    if layout == "tsf":
        return _steps(read_tsf(Path(source), Path(source).name, MAX_CSV_CELLS).values, config,
                      source)
    if layout == "rows":
        return _steps(read_rows(Path(source), Path(source).name, MAX_CSV_CELLS), config, source)
    try:
        with open(source, newline="", encoding="utf-8-sig") as f:
            rows = _csv_rows(f, source)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read {source} as a CSV file ({e}); give a UTF-8 CSV with a "
                        "header row") from None
    return table_from_rows(rows, config, source, layout)


def _steps(table: dict[str, np.ndarray], config: SeriesConfig, where
           ) -> tuple[list[str], dict[str, np.ndarray], dict[str, list[str]]]:
    """read_table's answer for series without timestamps (rows, .tsf): config.target of
    them (all by default), each with its step numbers as its times."""
    table = _select(table, config, where)
    stamps = {name: [str(i) for i in range(len(v))] for name, v in table.items()}
    return max(stamps.values(), key=len), table, stamps


def _select(table: dict[str, np.ndarray], config: SeriesConfig, where) -> dict:
    """The series config.target names (all when it is empty); DataError for one not there."""
    wanted = list(config.target) or list(table)
    missing = [t for t in wanted if t not in table]
    if missing:
        raise DataError(f"series {missing[0]!r} is not in {where}; its ids are "
                        f"{', '.join(list(table)[:10])}{' ...' if len(table) > 10 else ''}")
    return {name: table[name] for name in wanted}


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


def table_from_rows(rows: list[list[str]], config: SeriesConfig, path, layout: str = "auto"
                    ) -> tuple[list[str], dict[str, np.ndarray], dict[str, list[str]]]:
    """read_table on the rows of a wide or long CSV (`layout` wide, long, or auto: long when
    its header is); `path` names it in errors."""
    header, cols, n_rows = _columns_of(rows, path)
    long = None if layout == "wide" else long_columns(header)
    if layout == "long" and long is None:
        raise DataError(f"layout=long needs the columns id,timestamp,value (or unique_id,ds,y); "
                        f"{path} has {', '.join(header[:5])}: choose another --set layout")
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
    """Read the series, fill gaps, split each in time order (module docstring, Splits),
    scale with training stats. The horizon and the season are config's, or what the data
    declares where config leaves them 0 (M4's test file, a .tsf's @horizon and @frequency);
    DataError where config's horizon is not the one the data declares."""
    where = path.name if path is not None else config.data
    declared, header, layout = Declared(), [], "wide"
    if config.data in ("co2", "sunspots"):
        stamps, table = _statsmodels(config.data)
    else:
        _bounded(os.path.getsize(path), path)
        builtin_m4 = config.data in BUILTIN and config.data.startswith("m4-")
        layout = "rows" if builtin_m4 else layout_of(path, config)
        if layout == "tsf":
            tsf = read_tsf(path, where, MAX_CSV_CELLS)
            table, declared = _select(tsf.values, config, where), tsf_declared(tsf, where)
        elif layout == "rows":
            table = _select(read_rows(path, where, MAX_CSV_CELLS), config, where)
            declared = m4_declared(path, list(table), MAX_CSV_CELLS) or Declared()
            if builtin_m4 and not declared.test:
                test = path.name.replace("-train", "-test")
                raise DataError(f"M4's {test} is not beside {path}; put it there (the "
                                "Mcompetitions/M4-methods repository, Dataset/Test)")
        else:
            _, table, stamps = read_table(path, config, layout=layout)
            header = csv_header(path)
        if layout in ("rows", "tsf"):
            stamps = {name: None for name in table}  # steps, made below
    H, m = horizon_and_season(config, declared, where)
    split, ett = choose_split(config, layout, header, stamps, where)
    L = config.lookback
    names, series, times, borders, pads = [], [], [], [], []
    checked: set[int] = set()
    for name, v in table.items():
        if np.isnan(v).all():
            raise DataError(f"series {name!r} of {where} has no values")
        if stamps[name] is not None and id(stamps[name]) not in checked:
            checked.add(id(stamps[name]))  # the columns of a wide CSV share one time axis
            check_times(stamps[name], f"{where} ({name})" if len(table) > 1 else where)
        if declared.test:
            v = np.concatenate([v, declared.test[name]])
        v = fill_missing(v)
        pad = 0
        if split == "horizon":
            if layout in ("rows", "tsf"):  # too short for one training window: pad the front
                pad = max(0, 3 * H + L - len(v))
                v = np.concatenate([np.full(pad, v[0]), v])
            T = len(v)
            b = (T - 2 * H, T - H, T)
        elif split == "ett":
            b = ett
        else:
            T = len(v)
            n_test = max(H, round(T * config.test_fraction))
            n_val = max(H, round(T * config.val_fraction))
            b = (T - n_test - n_val, T - n_test, T)
        if b[0] < L + H:
            raise DataError(f"series {name!r} of {where} has {len(v)} rows: too few for lookback "
                            f"{L} + horizon {H} in its training part ({b[0]} rows); lower --set "
                            "lookback or --horizon, or give a longer series")
        names.append(name)
        series.append(v)
        times.append(stamps[name] if stamps[name] is not None else
                     [str(i) for i in range(len(v))])
        borders.append(b)
        pads.append(pad)
    mean = std = ()
    if config.scale:
        if config.mean:  # a trained run: its own training statistics
            mean, std = tuple(config.mean), tuple(config.std)
        else:
            train = [v[min(p, b[0] - 1):b[0]] for v, b, p in zip(series, borders, pads)]
            mean = tuple(float(t.mean()) for t in train)
            std = tuple(max(float(t.std()), 1e-8) for t in train)
        series = [(v - m_) / s for v, m_, s in zip(series, mean, std)]
    note = split_note(split, config, H, ett, declared)
    return SeriesData([torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in series],
                      tuple(names), times, borders, mean, std, horizon=H, season=m,
                      split=split, split_note=note, pads=tuple(pads) if any(pads) else ())


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
