"""Full runs of the vision presets and the bars they are held to.

    .venv/bin/python bench/vision_presets.py [--preset NAME ...] [--out DIR] [--json]

digits: test accuracy >= 99.0 % on the stratified 80/20 split (seed 0) in under a minute.
mnist:  test accuracy >= 99.0 % on the official 10k test set in <= 15 minutes of training, and
        >= 98 % of the PNG files in mnist/test_png_sample predicted right by `predict`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import monotile
from monotile.data import find_data

BARS = {"digits": (0.99, 60.0), "mnist": (0.99, 15 * 60.0)}  # accuracy, training seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", nargs="+", default=list(BARS))
    ap.add_argument("--out", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], dest="overrides",
                    metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="monotile-bench-"))
    overrides = dict(s.split("=", 1) for s in a.overrides)
    results = {}
    for preset in a.preset:
        t = time.perf_counter()
        run = monotile.train("vision", preset, out=out / preset, quiet=True,
                             overrides=overrides)
        wall = time.perf_counter() - t
        acc_bar, time_bar = BARS[preset]
        r = {**run.state["last_eval"], "train_seconds": run.state["elapsed_s"],
             "wall_seconds": wall, "parameters": run.parameters(),
             "bar_met": run.state["last_eval"]["accuracy"] >= acc_bar
             and run.state["elapsed_s"] <= time_bar}
        if preset == "mnist":
            files = monotile.load(run.dir).predict([find_data("mnist/test_png_sample")])
            r["png_sample_accuracy"] = files["accuracy"]
            r["bar_met"] = r["bar_met"] and files["accuracy"] >= 0.98
        results[preset] = r
    if a.json:
        print(json.dumps(results))
        return
    for preset, r in results.items():
        acc_bar, time_bar = BARS[preset]
        extra = (f", PNG sample {r['png_sample_accuracy']:.2%} (bar 98 %)"
                 if "png_sample_accuracy" in r else "")
        print(f"{preset}: {r['parameters']:,} parameters, test accuracy {r['accuracy']:.2%} on "
              f"{r['test_images']:.0f} images, train {r['train_seconds']:.0f} s, wall "
              f"{r['wall_seconds']:.0f} s{extra}; bar >= {acc_bar:.0%} in <= {time_bar:.0f} s: "
              f"{'met' if r['bar_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
