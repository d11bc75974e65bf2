"""Full runs of the text presets, the quality bars they are held to, and a sample of each.

    .venv/bin/python bench/text_presets.py [--preset NAME ...] [--out DIR] [--json]

shakespeare-char must reach a validation loss <= 1.88 (nanoGPT's figure for the same recipe);
speeches-bpe reports its validation loss and bits per byte (comparable across tokenizers).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import monotile

BARS = {"shakespeare-char": ("val_loss", 1.88)}
PROMPTS = {"shakespeare-char": "ROMEO:", "speeches-bpe": "Fellow citizens,"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", nargs="+", default=["shakespeare-char", "speeches-bpe"])
    ap.add_argument("--out", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="monotile-bench-"))
    results = {}
    for preset in a.preset:
        t = time.perf_counter()
        run = monotile.train("text", preset, out=out / preset, quiet=True)
        wall = time.perf_counter() - t
        figures = run.state["last_eval"]
        metric, bar = BARS.get(preset, (None, None))
        results[preset] = {
            **figures, "train_seconds": run.state["elapsed_s"], "wall_seconds": wall,
            "parameters": run.parameters(),
            "bar": None if bar is None else {"metric": metric, "max": bar,
                                             "met": figures[metric] <= bar},
            "sample": run.generate(PROMPTS.get(preset, "\n"), max_new_tokens=120,
                                   temperature=0.8, top_k=40, seed=0)}
    if a.json:
        print(json.dumps(results))
        return
    for preset, r in results.items():
        bar = r["bar"]
        verdict = "" if bar is None else \
            f"  bar {bar['metric']} <= {bar['max']}: {'met' if bar['met'] else 'NOT met'}"
        print(f"{preset}: {r['parameters']:,} parameters, val_loss {r['val_loss']:.4f}, "
              f"bits/byte {r['bits_per_byte']:.4f}, train {r['train_seconds']:.0f} s, "
              f"wall {r['wall_seconds']:.0f} s{verdict}")
        print("  sample: " + r["sample"].replace("\n", "\n          "))


if __name__ == "__main__":
    main()
