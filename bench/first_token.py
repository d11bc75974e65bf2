"""Time to the first token after start (issue 21, target 8: at most 3 s): from launching
`monotile generate SMOLLM2_RUN --dtype D --max-new-tokens 20` as a new process, as a shell
would, to the first byte it prints; the median of --rounds processes per dtype, after one not
counted (it may build the native kernels or measure this machine's layouts, once).

    .venv/bin/python bench/first_token.py [--dtypes float32,bfloat16,int8,int4] [--rounds 3]

SmolLM2 comes from bench/real_models.py's import (run it first).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import CACHE  # noqa: E402

TARGET = 3.0  # seconds
PROMPT = "What is the capital of France?"


def first_token(run_dir: Path, dtype: str) -> tuple[float, str]:
    """Seconds from the process's start to its first printed byte, and what it printed."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "monotile", "generate", str(run_dir),
                             "--dtype", dtype, "--max-new-tokens", "20", "--prompt", PROMPT],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    first = proc.stdout.read(1)
    seconds = time.perf_counter() - start
    rest = proc.stdout.read()
    if proc.wait() != 0 or not first:
        raise SystemExit(f"monotile generate --dtype {dtype} failed (exit {proc.returncode})")
    return seconds, (first + rest).decode(errors="replace").strip()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    run_dir = CACHE / "smollm2-run"
    if not (run_dir / "config.json").exists():
        raise SystemExit("run bench/real_models.py first: it imports SmolLM2")
    print(f"SmolLM2-135M-Instruct: `monotile generate` from start to its first printed token, "
          f"median of {a.rounds} processes (target <= {TARGET:.0f} s)")
    for dtype in a.dtypes.split(","):
        first_token(run_dir, dtype)
        times, text = [], ""
        for _ in range(a.rounds):
            seconds, text = first_token(run_dir, dtype)
            times.append(seconds)
        median = statistics.median(times)
        print(f"  {dtype:9} {median:5.2f} s (of {', '.join(f'{t:.2f}' for t in times)}) "
              f"{'met' if median <= TARGET else 'not met'}: {text[:50]!r}")


if __name__ == "__main__":
    main()
