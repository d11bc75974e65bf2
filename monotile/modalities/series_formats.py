"""The layouts forecasting benchmarks come in, and the splits that go with them.

Rows:     one series per row, `id, v1, v2, ...`, the rows of different lengths (M4's layout: a
          header "V1","V2",..., then "W1","35397.16",...). Empty cells at the end of a row are
          not values; an empty cell inside a row is a gap. The first line is a header unless
          its cells after the first are numbers other than the step labels 1..n or 0..n-1
          (then it is a series: a file without a header)
M4:       a `<Frequency>-train.csv` with its `-test.csv` beside it (the same ids): each series
          is its history followed by its test values; the horizon is the test file's width,
          the season that of the frequency the file is named for (M4 below)
Monash:   a .tsf file: `@attribute NAME TYPE` lines, `@frequency`, `@horizon`, `@missing`,
          `@equallength`, `@data`, then one series per line `attr1:attr2:...:v1,v2,...` with
          "?" for a missing value; the series' name is its `series_name` attribute. MASE's
          season is the shortest seasonality the archive lists for the frequency
          (MONASH_SEASON: its Python experiments take min(SEASONALITY_MAP[f]) for MASE;
          its R script's local models take the longest)
ETT:      Informer's borders: rows [0, 12 x 30 d) train, [12 x 30 d, 16 x 30 d) validate,
          [16 x 30 d, 20 x 30 d) test, d steps a day (24 hourly, 96 at 15 minutes); ETTh1 and
          ETTh2 (17,420 rows) and ETTm1 and ETTm2 (69,680) are known by their columns and length
Layout:   `auto` reads a .tsf file (or text whose first line starts with @) as Monash's; a
          long CSV by its header; a CSV whose first column holds ids (distinct, not numbers,
          not times) and whose other cells are numbers as rows when its header after the first
          cell is generic (V2..Vn, steps) and its rows differ in length, or M4's test file is
          beside it; such a file with rows of one length is refused (it reads as rows or as a
          wide table with its ids as times), and every other CSV is wide. A file is judged on
          its first 4 MiB (at most 200 rows); `--set layout=...` chooses instead
"""

from __future__ import annotations

import csv
import io
import itertools
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ConfigError, DataError

if TYPE_CHECKING:
    from .series import SeriesConfig

LAYOUTS = ("auto", "wide", "long", "rows", "tsf")
SPLITS = ("auto", "fraction", "ett", "horizon")
# M4's six frequencies: (horizon, seasonal period), as the competition scores them
M4 = {"yearly": (6, 1), "quarterly": (8, 4), "monthly": (18, 12), "weekly": (13, 1),
      "daily": (14, 1), "hourly": (48, 24)}
# Monash's frequencies: the season of MASE (weekly 365.25 / 7, as a whole number of steps)
MONASH_SEASON = {"4_seconds": 21600, "minutely": 1440, "10_minutes": 144, "15_minutes": 96,
                 "half_hourly": 48, "hourly": 24, "daily": 7, "weekly": 52, "monthly": 12,
                 "quarterly": 4, "yearly": 1}
ETT_COLUMNS = ("date", "HUFL", "HULL", "MUFL", "MULL", "LUFL", "LULL", "OT")
DEFAULT_HORIZON = 96  # horizon=0 and the data declares none
ETT_ROWS = {17420: 24, 69680: 96}  # ETTh1/2 hourly, ETTm1/2 every 15 minutes: steps a day
HEAD_BYTES = 4 * 2 ** 20  # what is read of a file to tell its layout
NA = ("", "NA", "NaN", "nan", "null", "?")
_TIME = re.compile(r"\d{1,4}[-/.]\d{1,2}([-/.]\d{1,4})?|\d{1,2}:\d{2}|^\d{4}-?[QqWw]\d{1,2}$")
_STEP = re.compile(r"([A-Za-z_ ]*)(\d+)")


@dataclass
class Declared:
    """What a file says of its own benchmark: the horizon, the season of MASE, the test values
    kept apart (M4's test file), and where that was said (for messages)."""
    horizon: int = 0
    season: int = 0
    what: str = ""
    frequency: str = ""
    test: dict[str, np.ndarray] = field(default_factory=dict)


# ---- which layout ---------------------------------------------------------------------------

def layout_of(path: Path, config) -> str:
    """The layout of the file at `path`: config.layout, or the one its content shows (module
    docstring, Layout)."""
    if config.layout != "auto":
        return config.layout
    if path.suffix.lower() == ".tsf":
        return "tsf"
    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError:
        return "wide"  # the reader says what is wrong with it
    if len(head) == HEAD_BYTES:
        head = head[:head.rfind(b"\n") + 1]  # whole lines only
    try:
        text = head.decode("utf-8-sig")
    except UnicodeDecodeError:
        return "wide"  # the reader says what is wrong with it
    return text_layout(text, path.name, paired=_m4_test_path(path) is not None)


def text_layout(text: str, where, paired: bool = False) -> str:
    """'tsf', 'long', 'rows' or 'wide' for the text of a file (or its first lines)."""
    first = next((s.strip() for s in text.splitlines()
                  if s.strip() and not s.lstrip().startswith("#")), "")
    if first.startswith("@"):
        return "tsf"
    try:
        rows = list(itertools.islice(csv.reader(io.StringIO(text)), 200))
    except csv.Error:
        return "wide"  # the reader says what is wrong with it
    return csv_layout(rows, where, paired)


def csv_layout(rows: list[list[str]], where, paired: bool = False) -> str:
    """'long', 'rows' or 'wide' for the first rows of a CSV; DataError when it reads as one
    series per row and as one per column alike."""
    rows = [_trimmed(r) for r in rows]
    rows = [r for r in rows if r]
    if len(rows) < 2:
        return "wide"
    header, body = [h.strip() for h in rows[0]], rows[1:]
    if long_columns(header) is not None:
        return "long"
    kind = _header_kind(header)
    if kind == "data":
        body = rows
    ids = [r[0].strip() for r in body]
    if not all(ids) or len(set(ids)) < len(ids) or all(_number(i) for i in ids) or \
            all(_TIME.search(i) for i in ids):
        return "wide"  # no ids: a time column, steps, or a series
    if not all(_number(c) or c.strip() in NA for r in body for c in r[1:]):
        return "wide"
    if kind == "names":
        return "wide"  # named columns: series
    if paired or len({len(r) for r in body}) > 1:
        return "rows"
    shown = ", ".join(repr(i) for i in ids[:2])
    raise DataError(f"{where} reads two ways: one series per row (ids {shown}, ... in its "
                    "first column) or one per column (that column as times); say which with "
                    "--set layout=rows or --set layout=wide")


def long_columns(header: list[str]) -> tuple[str, str, str] | None:
    """The (id, time, value) columns of a long-format header, or None."""
    lower = {h.lower(): h for h in header}
    for names in (("id", "timestamp", "value"), ("unique_id", "ds", "y"),
                  ("series", "time", "value"), ("id", "date", "value"), ("id", "time", "value")):
        if len(header) == 3 and all(n in lower for n in names):
            return tuple(lower[n] for n in names)
    return None


def _trimmed(row: list[str]) -> list[str]:
    """A CSV row without the empty cells at its end."""
    end = len(row)
    while end and not row[end - 1].strip():
        end -= 1
    return row[:end]


def _number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _header_kind(header: list[str]) -> str:
    """'generic' for V2..Vn, t1..tn or step labels after the first cell; 'data' for other
    numbers (the first line is a series, the file has no header); 'names' otherwise."""
    cells = header[1:]
    if not cells:
        return "names"
    if all(_number(c) for c in cells):
        steps = [float(c) for c in cells]
        return "generic" if steps in (list(range(len(steps))), list(range(1, len(steps) + 1))) \
            else "data"
    parts = [_STEP.fullmatch(c) for c in cells]
    if all(parts) and len({p.group(1) for p in parts}) == 1:
        return "generic"
    return "names"


# ---- one series per row -------------------------------------------------------------------

def read_rows(source, where, max_values: int) -> dict[str, np.ndarray]:
    """{id: values} of a one-series-per-row CSV (module docstring, Rows): a path, or the rows
    already read. DataError for a row without an id, an id given twice, a cell that is not a
    number, a row without values, more than `max_values` values in all."""
    if isinstance(source, Path):
        try:
            with open(source, newline="", encoding="utf-8-sig") as f:
                return _rows(csv.reader(f), where, max_values)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {source} as a CSV file ({e}); give a UTF-8 CSV with "
                            "one series per row") from None
        except csv.Error as e:
            raise DataError(f"{where} is not a readable CSV ({e}); give a UTF-8 CSV with one "
                            "series per row") from None
    return _rows(iter(source), where, max_values)


def _rows(reader, where, max_values: int) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    first, count = True, 0
    for line, row in enumerate(reader, 1):
        row = _trimmed(row)
        if not row:
            continue
        if first:
            first = False
            if _header_kind([c.strip() for c in row]) != "data":
                continue  # the header
        name = row[0].strip()
        if not name:
            raise DataError(f"row {line} of {where} has no id in its first cell; give each "
                            "row its series' id, then its values")
        if name in out:
            raise DataError(f"id {name!r} appears twice in {where} (the second time in row "
                            f"{line}); give each series one row")
        cells = row[1:]
        try:
            v = np.array(cells, dtype=np.float64)
        except ValueError:
            v = np.empty(len(cells))
            for j, c in enumerate(cells):
                c = c.strip()
                try:
                    v[j] = np.nan if c in NA else float(c)
                except ValueError:
                    raise DataError(f"row {line} of {where} ({name!r}) holds {c!r} in column "
                                    f"{j + 2}, which is not a number; give numbers (an empty "
                                    "cell for a gap)") from None
        count = _add(out, name, v, where, count, max_values)
    if not out:
        raise DataError(f"{where} has no series; give one row per series: its id, then its "
                        "values")
    return out


def _add(out: dict, name: str, v: np.ndarray, where, count: int, max_values: int) -> int:
    """out[name] = v, a series of a one-series-per-row file or a .tsf; the values read so far.
    DataError for a series without a value or past `max_values` values in all."""
    if not np.isfinite(v).any():
        raise DataError(f"series {name!r} of {where} has no values")
    count += len(v)
    if count > max_values:
        raise DataError(f"{where} holds more than {max_values:,} values, more than this reads; "
                        "give fewer series")
    out[name] = v
    return count


def _m4_test_path(train: Path) -> Path | None:
    """M4's test file beside a -train.csv, if it is there."""
    if "-train" not in train.name:
        return None
    test = train.with_name(train.name.replace("-train", "-test"))
    return test if test.is_file() else None


def m4_declared(train: Path, ids, max_values: int) -> Declared | None:
    """The test values of M4's test file beside `train` (None if there is none), with the
    horizon they make and the season of the frequency the file is named for. DataError for a
    series the test file lacks, or test rows of different lengths."""
    path = _m4_test_path(train)
    if path is None:
        return None
    test = read_rows(path, path.name, max_values)
    missing = [i for i in ids if i not in test]
    if missing:
        raise DataError(f"series {missing[0]!r} of {train.name} has no row in {path.name}; "
                        "give M4's test file of the same frequency beside it")
    widths = {len(test[i]) for i in ids}
    if len(widths) > 1:
        raise DataError(f"{path.name} holds test rows of {min(widths)} to {max(widths)} "
                        "values; M4's test file holds the horizon's values for every series")
    frequency = train.name.split("-train")[0].lower()
    return Declared(horizon=widths.pop(), season=M4.get(frequency, (0, 0))[1],
                    what=f"{path.name} beside {train.name}", frequency=frequency,
                    test={i: test[i] for i in ids})


# ---- Monash's .tsf -----------------------------------------------------------------------

@dataclass
class Tsf:
    """A .tsf file: its series, frequency, horizon (0 if it declares none) and flags."""
    values: dict[str, np.ndarray]
    frequency: str = ""
    horizon: int = 0
    missing: bool | None = None
    equal_length: bool | None = None


def read_tsf(source: Path | str, where, max_values: int) -> Tsf:
    """A Monash .tsf file (module docstring, Monash), a path or its text. DataError for a
    line out of place, attributes that do not match the declared ones, a value that is not a
    number or "?", a series with no values, more than `max_values` values in all."""
    if isinstance(source, Path):
        try:
            raw = source.read_bytes()
        except OSError as e:
            raise DataError(f"cannot read {source} ({e}); give a .tsf file") from None
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            text = raw.decode("cp1252", errors="replace")  # the archive's own encoding
    else:
        text = source
    attributes: list[tuple[str, str]] = []
    out = Tsf({})
    in_data, count = False, 0
    for line_no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            if not line.startswith("@"):
                raise DataError(f"line {line_no} of {where} is not an @ declaration before "
                                "@data; a .tsf file declares its attributes, then @data, then "
                                "one series per line")
            key, _, rest = line.partition(" ")
            key, rest = key.lower(), rest.strip()
            if key == "@attribute":
                parts = rest.split()
                if len(parts) != 2:
                    raise DataError(f"line {line_no} of {where} is {line!r}; an attribute is "
                                    "`@attribute NAME TYPE`")
                attributes.append((parts[0], parts[1]))
            elif key == "@frequency":
                out.frequency = rest.lower()
            elif key == "@horizon":
                if not rest.isdigit() or int(rest) <= 0:
                    raise DataError(f"line {line_no} of {where} declares horizon {rest!r}; "
                                    "give a positive number of steps")
                out.horizon = int(rest)
            elif key in ("@missing", "@equallength"):
                flag = rest.lower() in ("true", "1", "yes")
                if key == "@missing":
                    out.missing = flag
                else:
                    out.equal_length = flag
            elif key == "@data":
                in_data = True
            continue
        parts = line.split(":")
        if len(parts) != len(attributes) + 1:
            k = len(parts) - 1
            raise DataError(f"line {line_no} of {where} has {k} attribute{'s' * (k != 1)} "
                            f"before its values, not the {len(attributes)} its header "
                            "declares; write attr1:...:v1,v2,...")
        names = dict(zip((a for a, _ in attributes), parts))
        name = names.get("series_name") or ":".join(
            p for p, (_, kind) in zip(parts, attributes) if kind == "string") or \
            f"T{len(out.values) + 1}"
        if name in out.values:
            raise DataError(f"series {name!r} appears twice in {where} (line {line_no}); give "
                            "each series its own name")
        cells = parts[-1].split(",")
        try:
            v = np.array(["nan" if c.strip() == "?" else c for c in cells], dtype=np.float64)
        except ValueError:
            bad = next(c for c in cells if c.strip() != "?" and not _number(c))
            raise DataError(f"series {name!r} of {where} (line {line_no}) holds {bad!r}, "
                            "which is not a number; give numbers, ? for a missing value") \
                from None
        count = _add(out.values, name, v, where, count, max_values)
    if not out.values:
        raise DataError(f"{where} has no series after @data; give one line per series")
    return out


def tsf_declared(tsf: Tsf, where) -> Declared:
    """The horizon and the season of MASE a .tsf file declares (0 where it does not)."""
    return Declared(horizon=tsf.horizon, season=MONASH_SEASON.get(tsf.frequency, 0),
                    what=str(where), frequency=tsf.frequency)


# ---- ETT ----------------------------------------------------------------------------------

def csv_header(path: Path) -> list[str]:
    """The first non-blank line of a CSV, as its cells (stripped); [] if unreadable."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            head = f.read(64 * 1024)
        for row in csv.reader(io.StringIO(head)):
            if any(c.strip() for c in row):
                return [c.strip() for c in row]
    except (OSError, UnicodeDecodeError, csv.Error):
        pass
    return []


def ett_steps(header: list[str], rows: int) -> int | None:
    """Steps a day of a file of the ETT family (its columns and its length), else None."""
    if tuple(header) == ETT_COLUMNS:
        return ETT_ROWS.get(rows)
    return None


def steps_per_day(times: list[str], where) -> int:
    """How many rows make a day, from the usual step between the timestamps."""
    import pandas as pd
    try:
        t = pd.to_datetime(pd.Series(times[:2000]), format="mixed")
        step = t.diff().iloc[1:].mode().iloc[0].total_seconds()
    except (ValueError, TypeError, OverflowError, IndexError):
        step = 0
    if not step or 86400 % step:
        raise DataError(f"split=ett needs timestamps a fixed step apart that divides a day (an "
                        f"hour, 15 minutes); {where}'s are not; choose --set split=fraction "
                        "or split=horizon")
    return int(86400 // step)


def ett_borders(per_day: int, rows: int, where) -> tuple[int, int, int]:
    """Informer's borders at `per_day` rows a day: 12, 16 and 20 months of 30 days."""
    b = (12 * 30 * per_day, 16 * 30 * per_day, 20 * 30 * per_day)
    if rows < b[2]:
        raise DataError(f"split=ett needs 20 months of 30 days ({b[2]:,} rows at {per_day} a "
                        f"day); {where} has {rows:,}; choose --set split=fraction")
    return b


# ---- the split -----------------------------------------------------------------------------

def horizon_and_season(config: SeriesConfig, declared: Declared, where) -> tuple[int, int]:
    """H and m: config's, else what the data declares, else 96 and 1; DataError where config
    sets a horizon other than the one the data declares."""
    if config.horizon and declared.horizon and config.horizon != declared.horizon:
        m4 = declared.test and declared.frequency in M4
        raise DataError(f"{declared.what} sets the horizon at {declared.horizon} "
                        f"({'its test values' if declared.test else 'its @horizon'}), but "
                        f"horizon is {config.horizon}; train with --horizon {declared.horizon}"
                        + (f" (or --preset m4-{declared.frequency})" if m4 else ""))
    return (config.horizon or declared.horizon or DEFAULT_HORIZON,
            config.season or declared.season or 1)


def choose_split(config: SeriesConfig, layout: str, header: list[str], stamps: dict,
                 where) -> tuple[str, tuple | None]:
    """Which split (fraction, horizon or ett), and ETT's borders where it is ett."""
    split = config.split
    rows = len(next(iter(stamps.values())) or ()) if stamps else 0
    per_day = ett_steps(header, rows) if layout == "wide" else None
    if split == "auto":
        split = "horizon" if layout in ("rows", "tsf") else "ett" if per_day else "fraction"
        if split == "fraction" and tuple(header) == ETT_COLUMNS:
            warnings.warn(f"{where} has the ETT family's columns but {rows:,} rows (ETTh1/2 "
                          "have 17,420, ETTm1/2 69,680): split by fraction; --set split=ett "
                          "takes Informer's borders", stacklevel=3)
    if split != "ett":
        return split, None
    if layout != "wide":
        raise ConfigError(f"split=ett needs a wide CSV with a time column (ETT's layout); "
                          f"{where} is read as {layout}: choose split=horizon or fraction")
    times = next(iter(stamps.values()))
    return "ett", ett_borders(per_day or steps_per_day(times, where), rows, where)


def split_note(split: str, config: SeriesConfig, H: int, ett, declared: Declared) -> str:
    """The split in one line, as `monotile eval` says it."""
    if split == "ett":
        a, b, c = ett
        return (f"ett: Informer's borders, rows [0, {a}) train, [{a}, {b}) validate, [{b}, {c}) "
                f"test (12/4/4 months of 30 days at {a // 360} steps a day)")
    if split == "horizon":
        source = f" ({declared.what.split(' beside')[0]})" if declared.test else ""
        return (f"horizon: the last {H} values of each series test{source}, the {H} before "
                "them validate")
    return (f"fraction: the last {config.test_fraction:.0%} of each series tests, the "
            f"{config.val_fraction:.0%} before it validates")
