"""M4 through the files users have: the m4-weekly preset read by its built-in name and by the
path of its two files (the one-series-per-row reader), which must score the same OWA; and one
other frequency, quarterly, made from the weekly series, trained and scored end to end.

    .venv/bin/python bench/m4.py [--only weekly quarterly] [--out DIR] [--set K=V ...] [--json]

weekly:    the m4-weekly preset twice, as `--preset m4-weekly` and as `--preset m4-weekly
           --data .../m4/Weekly-train.csv` (Weekly-test.csv beside it): sMAPE, MASE and OWA
           against Naive2 of each, as `monotile eval` reports them, and whether they are equal
quarterly: each weekly series (its history and its 13 test values) averaged over 13-week
           quarters counted back from its end; the last 8 quarters written as
           Quarterly-test.csv, the quarters before them as Quarterly-train.csv, in M4's layout
           (series with at least 16 quarters of history, M4 quarterly's shortest). The
           m4-quarterly preset (horizon 8, season 4) trained on them by path; sMAPE, MASE and
           OWA beside Naive2, Theta and ETS, each fitted on each series' whole history
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

import monotile
from monotile.data import find_data
from monotile.modalities.series_formats import read_rows

METHODS = ("model", "naive2", "theta", "ets")


def train(preset: str, out: Path, overrides: dict, data: Path | None = None) -> dict:
    """Train a preset, then `monotile eval`'s figures of its best checkpoint, with its time."""
    t = time.perf_counter()
    run = monotile.train("series", preset, out=out, data=data, quiet=True, overrides=overrides)
    wall = time.perf_counter() - t
    figures = monotile.load(run.dir, checkpoint="best").report()
    return {**figures, "train_seconds": run.state["elapsed_s"], "wall_seconds": wall}


def table(figures: dict) -> list[str]:
    """sMAPE, MASE and OWA per method, the model's from its test figures."""
    rows = []
    for method in METHODS:
        key = "test" if method == "model" else method
        if f"{key}_smape" not in figures:
            continue
        owa = figures["owa"] if method == "model" else figures.get(f"{method}_owa", 1.0)
        rows.append(f"  {method:<7} sMAPE {figures[f'{key}_smape']:7.3f}  MASE "
                    f"{figures[f'{key}_mase']:6.3f}  OWA {owa:.3f}")
    return rows


def quarterly_files(folder: Path) -> tuple[Path, int]:
    """Quarterly-train.csv and Quarterly-test.csv made from M4's weekly series (module
    docstring); the training file's path and the number of series."""
    weekly = find_data("m4/Weekly-train.csv")
    history = read_rows(weekly, weekly.name, 10 ** 8)
    test = read_rows(weekly.with_name("Weekly-test.csv"), "Weekly-test.csv", 10 ** 8)
    series = {}
    for name, values in history.items():
        v = np.concatenate([values, test[name]])
        n = len(v) // 13
        if n >= 16 + 8:
            series["Q" + name[1:]] = v[len(v) - 13 * n:].reshape(n, 13).mean(1)
    width = max(len(v) for v in series.values()) - 8
    for kind, part in (("train", lambda v: v[:-8]), ("test", lambda v: v[-8:])):
        cols = width if kind == "train" else 8
        with open(folder / f"Quarterly-{kind}.csv", "w", newline="") as f:
            w = csv.writer(f, quoting=csv.QUOTE_ALL)
            w.writerow([f"V{i + 1}" for i in range(cols + 1)])
            for name, v in series.items():
                cells = [f"{x:.4f}" for x in part(v)]
                w.writerow([name, *cells, *[""] * (cols - len(cells))])
    return folder / "Quarterly-train.csv", len(series)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=["weekly", "quarterly"])
    ap.add_argument("--out", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], dest="overrides",
                    metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="monotile-bench-m4-"))
    overrides = dict(s.split("=", 1) for s in a.overrides)
    results: dict = {}
    lines: list[str] = []

    if "weekly" in a.only:
        by_name = train("m4-weekly", out / "weekly-by-name", overrides)
        by_path = train("m4-weekly", out / "weekly-by-path", overrides,
                        data=find_data("m4/Weekly-train.csv"))
        equal = all(by_name[k] == by_path[k] for k in ("test_smape", "test_mase", "owa"))
        results["weekly"] = {"by_name": by_name, "by_path": by_path, "equal": equal}
        lines.append(f"m4-weekly, built-in (train {by_name['train_seconds']:.0f} s); split: "
                     f"{by_name['split']}")
        lines += table(by_name)
        lines.append(f"m4-weekly, by path (train {by_path['train_seconds']:.0f} s): OWA "
                     f"{by_path['owa']:.6f} against {by_name['owa']:.6f}: "
                     f"{'equal' if equal else 'NOT equal'}")

    if "quarterly" in a.only:
        folder = out / "quarterly-data"
        folder.mkdir(parents=True, exist_ok=True)
        path, n = quarterly_files(folder)
        figures = train("m4-quarterly", out / "quarterly", overrides, data=path)
        results["quarterly"] = {"series": n, **figures}
        lines.append(f"m4-quarterly on {n} series made from the weekly ones (train "
                     f"{figures['train_seconds']:.0f} s); split: {figures['split']}")
        lines += table(figures)

    if a.json:
        print(json.dumps(results, default=float))
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
