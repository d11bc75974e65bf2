"""How a decoding step's float layers are laid out, each layer shape timed every way monotile
chooses among (a pass in a model's order, layer after layer in their counts, random weights,
best of five), with the way each shape takes and the pass's total against the default way:

    eager float32, bfloat16   packed.layouts: plain nn.Linear, oneDNN's packing for one row
                              and for each of packed.HINTS (bf16 where oneDNN packs it);
                              `generate --dtype float32|bfloat16` takes these verdicts
    float32 --compile         native.float32_native_shapes: plain F.linear, MKL's packed
                              SGEMM (what torch.compile makes of a frozen fp32 weight) and
                              monotile's float_linear (infer/native.py)

    .venv/bin/python bench/layouts.py [RUN] [--threads 2] [--json]

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


def table(shapes, times: dict, default: str, choices: list[str]) -> dict:
    """Each shape's ms a pass for every way, the fastest among `choices`, and the pass's total
    all in `default` against as chosen."""
    rows = [{"shape": f"{n_in}->{n_out}", "layers": count,
             **{way: t[shape] * 1e3 for way, t in times.items()},
             "chosen": min(choices, key=lambda way: times[way][shape])}
            for shape, count in shapes.items() for n_in, n_out, _ in [shape]]
    return {"rows": rows, "default": default, "default_ms": sum(r[default] for r in rows),
            "chosen_ms": sum(r[r["chosen"]] for r in rows)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run", nargs="?", default=str(CACHE / "smollm2-run"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import monotile
    from monotile.infer import native
    from monotile.infer.packed import LAYOUTS, layout_maker, packing_available, time_ways
    if not (Path(a.run) / "config.json").exists():
        raise SystemExit(f"{a.run} is not a run: run bench/real_models.py first, or give one")
    model = monotile.load(a.run).model
    shapes = Counter((m.in_features, m.out_features, 1) for m in model.modules()
                     if type(m) is nn.Linear)
    report = {}
    for dtype in (torch.float32, torch.bfloat16):
        if packing_available("cpu", dtype):
            times = time_ways(shapes, {way: layout_maker(h) for way, h in LAYOUTS.items()},
                              dtype)
            report[str(dtype).removeprefix("torch.")] = table(shapes, times, "plain",
                                                              list(LAYOUTS))
    if native.available():
        names = ("plain", "mkl", "native") if torch._C.has_mkl else ("plain", "native")
        other = names[-2]  # the compiler's way: MKL's packing where PyTorch has MKL
        times = native.time_float32_ways({s[:2]: c for s, c in shapes.items()}, names)
        times = {way: {(*s, 1): t for s, t in by.items()} for way, by in times.items()}
        report["float32 --compile"] = table(shapes, times, other, [other, "native"])
    if a.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{a.run}: ms a pass in each shape's layers, one row of x, {a.threads} threads, "
          "best of 5 ('rows': packed for its one row)")
    for name, r in report.items():
        ways = [w for w in r["rows"][0] if w not in ("shape", "layers", "chosen")]
        print(f"{name}\n{'shape':>12} {'layers':>6} " + " ".join(f"{w:>8}" for w in ways)
              + "  chosen")
        for row in r["rows"]:
            print(f"{row['shape']:>12} {row['layers']:6d} "
                  + " ".join(f"{row[w]:8.2f}" for w in ways) + f"  {row['chosen']}")
        print(f"a pass: {r['default_ms']:.2f} ms all {r['default']}, {r['chosen_ms']:.2f} ms "
              f"as chosen ({r['default_ms'] / r['chosen_ms']:.2f}x)")


if __name__ == "__main__":
    main()
