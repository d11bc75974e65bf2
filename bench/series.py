"""The forecasting presets in full, against the statistical baselines, and their speed.

    .venv/bin/python bench/series.py [--only etth1 m4-weekly co2 sunspots]
                                     [--horizons 96 192 336 720] [--out DIR] [--set K=V ...]

etth1:     test MSE on the standardised data (Informer split) per horizon; bar <= 0.39 at 96
           (published: PatchTST/64 0.370, DLinear 0.375). The best checkpoint by validation
           MSE, as PatchTST's early stopping keeps.
m4-weekly: sMAPE, MASE and OWA on M4's weekly test set; target OWA < 1.0 (better than Naive2);
           statsmodels' ETS and Theta fitted on each series' whole history beside it.
co2, sunspots: a rolling-origin backtest over the test part, MASE beside seasonal naive,
           Holt-Winters (additive trend and season), damped ETS and ARIMA (the airline model)
           fitted on the same history.
speed:     training windows/s, and the latency of one `predict` on a history CSV.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import monotile
from monotile.data import find_data

ORIGINS = {"co2": 8, "sunspots": 5}


def train(preset: str, out: Path, overrides: dict):
    t = time.perf_counter()
    run = monotile.train("series", preset, out=out, quiet=True, overrides=overrides)
    wall = time.perf_counter() - t
    state = run.state
    best = monotile.load(run.dir, checkpoint="best")
    speed = state["step"] * run.train_config.batch_size / state["elapsed_s"]
    return best, {"train_seconds": state["elapsed_s"], "wall_seconds": wall,
                  "windows_per_s": speed, "parameters": run.parameters()}


def predict_latency(run, rows: int = 400, repeats: int = 10) -> tuple[float, float]:
    """Seconds of a run's first predict() on the last `rows` rows of ETTh1 (all 7 columns),
    which reads the run's data and calibrates its intervals, and the median of the next ones."""
    lines = find_data("ett/ETTh1.csv").read_text().splitlines()
    path = Path(tempfile.mkdtemp()) / "history.csv"
    path.write_text("\n".join([lines[0], *lines[-rows:]]) + "\n")
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        run.predict([path])
        times.append(time.perf_counter() - t)
    return times[0], statistics.median(times[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", default=["etth1", "m4-weekly", "co2", "sunspots"])
    ap.add_argument("--horizons", nargs="+", type=int, default=[96])
    ap.add_argument("--out", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], dest="overrides",
                    metavar="KEY=VALUE")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="monotile-bench-"))
    overrides = dict(s.split("=", 1) for s in a.overrides)
    results: dict = {}
    lines: list[str] = []

    if "etth1" in a.only:
        for h in a.horizons:
            run, speed = train("etth1", out / f"etth1-{h}", dict(overrides, horizon=h))
            figures = {**run.report(), **speed}
            if h == a.horizons[0]:
                figures["predict_first_seconds"], figures["predict_seconds"] = \
                    predict_latency(run)
            results[f"etth1-{h}"] = figures
            bar = f"; bar <= 0.39: {'met' if figures['test_mse'] <= 0.39 else 'NOT met'}" \
                if h == 96 else ""
            lines.append(
                f"etth1 H={h}: test MSE {figures['test_mse']:.3f}, MAE {figures['test_mae']:.3f} "
                f"over {figures['test_windows']} windows (seasonal naive MSE "
                f"{figures['seasonal_naive_mse']:.3f}), 80 % interval coverage "
                f"{figures['test_coverage']:.1%}; {speed['parameters']:,} parameters, train "
                f"{speed['train_seconds']:.0f} s ({speed['windows_per_s']:.0f} windows/s){bar}")
            if "predict_seconds" in figures:
                lines.append(f"  predict on a 400-row, 7-column history: "
                             f"{figures['predict_seconds'] * 1000:.0f} ms, the first call "
                             f"{figures['predict_first_seconds']:.2f} s (calibration)")

    if "m4-weekly" in a.only:
        run, speed = train("m4-weekly", out / "m4-weekly", overrides)
        figures = {**run.report(), **speed}
        figures["baselines"] = {}
        # M4's test set is one origin per series: the 13 values after its history
        base = run.task.backtest(run.model, 1, methods=("naive2", "ets", "theta"))["methods"]
        n2 = base["naive2"]
        for name in ("model", "naive2", "ets", "theta"):
            m = base[name]
            owa = 0.5 * (m["smape"] / n2["smape"] + m["mase"] / n2["mase"])
            figures["baselines"][name] = {"smape": m["smape"], "mase": m["mase"], "owa": owa}
        results["m4-weekly"] = figures
        lines.append(f"m4-weekly: {speed['parameters']:,} parameters, train "
                     f"{speed['train_seconds']:.0f} s ({speed['windows_per_s']:.0f} windows/s); "
                     f"target OWA < 1.0: "
                     f"{'met' if figures['baselines']['model']['owa'] < 1 else 'NOT met'}")
        for name, m in figures["baselines"].items():
            lines.append(f"  {name:<8} sMAPE {m['smape']:6.3f}  MASE {m['mase']:6.3f}  "
                         f"OWA {m['owa']:.3f}")

    for preset in ("co2", "sunspots"):
        if preset not in a.only:
            continue
        run, speed = train(preset, out / preset, overrides)
        k = ORIGINS[preset]
        bt = run.task.backtest(run.model, k, methods=("seasonal_naive", "holt_winters", "ets",
                                                       "arima"))
        results[preset] = {**bt, **speed}
        lines.append(f"{preset}: backtest over {k} origins, horizon {bt['horizon']}, season "
                     f"{bt['season']}; train {speed['train_seconds']:.0f} s")
        for name, m in bt["methods"].items():
            label = {"ets": "ets (damped)", "holt_winters": "holt-winters"}.get(name, name)
            cover = f"  coverage {m['coverage']:.0%}" if "coverage" in m else ""
            lines.append(f"  {label:<15} MASE {m['mase']:6.3f}  sMAPE {m['smape']:6.3f}{cover}")

    if a.json:
        print(json.dumps(results, default=float))
    else:
        print("\n".join(lines))


if __name__ == "__main__":
    main()
