"""The fp32 products of one decoding step, each layer shape timed three ways as
native.float32_native_shapes times them to choose (a pass in a model's order, layer after layer
in their counts, random weights, best of five): plain F.linear (MKL's GEMV), MKL's packed
SGEMM (what torch.compile makes of a frozen fp32 weight) and monotile's float_linear
(infer/native.py); with the verdict `generate --compile` takes for each shape, and the pass's
total under the compiler's way alone against the chosen mix.

    .venv/bin/python bench/fp32_products.py [RUN] [--threads 2] [--json]

RUN defaults to bench/real_models.py's SmolLM2 import (run that bench first).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from real_models import CACHE  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default=str(CACHE / "smollm2-run"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import monotile
    from monotile.infer import native
    if not native.available():
        raise SystemExit(f"the native kernels could not be built: {native.reason()}")
    if not (Path(a.run) / "config.json").exists():
        raise SystemExit(f"{a.run} is not a run: run bench/real_models.py first, or give one")
    model = monotile.load(a.run).model
    shapes = Counter((m.in_features, m.out_features) for m in model.modules()
                     if type(m) is nn.Linear)
    names = ("plain", "mkl", "native") if torch._C.has_mkl else ("plain", "native")
    other = "mkl" if torch._C.has_mkl else "plain"  # the compiler's way when it packs
    times = native.time_float32_ways(shapes, names)
    rows = [{"shape": f"{n_in}->{n_out}", "layers": count,
             **{name: times[name][(n_in, n_out)] * 1e3 for name in names},
             "native_wins": times["native"][(n_in, n_out)] < times[other][(n_in, n_out)]}
            for (n_in, n_out), count in shapes.items()]
    compiler = sum(r[other] for r in rows)
    chosen = sum(r["native"] if r["native_wins"] else r[other] for r in rows)
    if a.json:
        print(json.dumps({"rows": rows, "compiler_ms": compiler, "chosen_ms": chosen}, indent=2))
        return
    print(f"{a.run}: ms a pass in each shape's layers, {a.threads} threads, best of 5")
    print(f"{'shape':>12} {'layers':>6} " + " ".join(f"{n:>8}" for n in names) + "  native?")
    for r in rows:
        print(f"{r['shape']:>12} {r['layers']:6d} " + " ".join(f"{r[n]:8.2f}" for n in names)
              + f"  {'yes' if r['native_wins'] else 'no'}")
    print(f"a pass: {compiler:.2f} ms all {other}, {chosen:.2f} ms as chosen "
          f"({compiler / chosen:.2f}x)")


if __name__ == "__main__":
    main()
