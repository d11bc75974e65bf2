"""Token shards on this machine: how fast `monotile prepare` tokenizes, how little memory it
and training on its shards hold, and what reading shards costs a training step.

(a) prepare's throughput in MB/s of text beside a plain batch encode of the same documents
    by Hugging Face `tokenizers` (Tokenizer.encode_batch on all cores, ids thrown away; the
    faster of a run before and one after prepare), and the ratio;
(b) on a synthetic corpus of --size (the speeches' and Tiny Shakespeare's sentences shuffled
    into paragraphs, in files of 64 MB in a temporary folder): the peak memory of
    `monotile prepare` and of `monotile train text --data SHARDS --preset speeches-bpe --set
    max_steps=100`, and the time from starting that command to its first step;
(c) training tokens/s of the shakespeare-char preset from shards and from the text in
    memory: the same model and steps, trained in rotating blocks of 25 steps in one process
    so that a noisy machine slows both alike (bench/train_text.py's way), and the
    microseconds each takes to draw a batch of 12 x 64 (the data path alone).
Memory is sampled with psutil over the command's process tree: every 0.2 s the sum of its
processes' proportional set sizes (PSS: a page shared by n processes counts 1/n in each, so
forked workers are not counted n times over; RSS where PSS is not known), every 20 ms the
largest resident set of one of them.

    .venv/bin/python bench/prepare.py [--size 2GB] [--workers N] [--steps 200] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

from monotile.data import find_data
from monotile.modalities.text_sources import PARAGRAPH_END
from monotile.tokenizers import Tokenizer

FILE_BYTES = 64 << 20


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([kKmMgG]?)B?\s*", text)
    if not m:
        raise SystemExit(f"--size {text!r}: write e.g. 50MB or 2GB")
    return int(float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()])


def make_corpus(folder: Path, size: int, seed: int = 0) -> list[Path]:
    """Files of shuffled sentences of the speeches and Tiny Shakespeare, 3-12 sentences a
    paragraph, a blank line after each, `size` bytes in all."""
    text = " ".join(find_data(n).read_text(encoding="utf-8") for n in
                    ("speeches/speeches_public_domain.txt", "tinyshakespeare/input.txt"))
    sentences = [s.strip().replace("\n", " ") for s in re.split(r"(?<=[.!?])\s+", text)]
    sentences = np.array([s for s in sentences if len(s) > 1], dtype=object)
    rng, files, written = np.random.default_rng(seed), [], 0
    while size - written > 1024:
        parts, n = [], 0
        target = min(FILE_BYTES, size - written)
        while n < target:
            picks = sentences[rng.integers(len(sentences), size=20_000)]
            cuts = np.cumsum(rng.integers(3, 13, size=len(picks) // 3))
            paras = [" ".join(p) + "\n\n" for p in np.split(picks, cuts[cuts < len(picks)])]
            chunk = "".join(paras)
            parts.append(chunk)
            n += len(chunk.encode("utf-8"))
        path = folder / f"part-{len(files):04d}.txt"
        data = "".join(parts).encode("utf-8")[:target]
        data = data[:data.rfind(b"\n\n") + 2]  # whole paragraphs
        path.write_bytes(data)
        files.append(path)
        written += len(data)
    return files


def measure(cmd: list[str], *, first_step: Path | None = None) -> dict:
    """Run `cmd`, sampling the resident memory of its process tree; with `first_step`, the
    seconds until that metrics.jsonl holds a training step."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    top, peak_tree, peak_one, first, polls = psutil.Process(proc.pid), 0, 0, None, 0
    while proc.poll() is None:
        try:
            tree = [top, *top.children(recursive=True)]
            peak_one = max(peak_one, max(p.memory_info().rss for p in tree))
            if polls % 10 == 0:  # PSS costs ~6 ms a process to read: 1 in 10 polls
                peak_tree = max(peak_tree, sum(getattr(m, "pss", m.rss) for m in
                                               (p.memory_full_info() for p in tree)))
        except psutil.Error:
            pass
        polls += 1
        if first_step is not None and first is None and first_step.exists() and \
                '"loss"' in first_step.read_text():
            first = time.perf_counter() - t0
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_pss_mb": peak_tree / 1e6,
            "peak_process_mb": peak_one / 1e6, "first_step_s": first, "stdout": out}


def baseline_encode(files: list[Path], tokenizer: Path) -> dict:
    """Hugging Face tokenizers alone: each file read, cut into its paragraphs, encoded in
    batches of about 4 MB with encode_batch (its own threads on every core)."""
    from tokenizers import Tokenizer as HFTokenizer
    tok = HFTokenizer.from_file(str(tokenizer))
    t0, n_bytes, n_tokens = time.perf_counter(), 0, 0
    for path in files:
        raw = path.read_bytes()
        n_bytes += len(raw)
        bounds = [0, *(m.end() for m in PARAGRAPH_END.finditer(raw)), len(raw)]
        docs = [raw[a:b].decode("utf-8") for a, b in zip(bounds, bounds[1:]) if b > a]
        batch, size = [], 0
        for doc in docs + [None]:
            if doc is None or size > 4 << 20:
                n_tokens += sum(len(e.ids) for e in tok.encode_batch(batch))
                batch, size = [], 0
            if doc is not None:
                batch.append(doc)
                size += len(doc)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "mb_per_s": n_bytes / 1e6 / seconds, "tokens": n_tokens}


def batch_draw_us(shards: Path, n: int = 2000) -> dict:
    """Microseconds to draw one training batch of the shakespeare-char preset (12 x 64), from
    the text held in memory and from its shards."""
    import torch

    from monotile.modalities.text import TextTask
    from monotile.presets import PRESETS
    from monotile.run import build_configs
    configs = build_configs("text", PRESETS["shakespeare-char"])
    out = {}
    for name, data in (("memory", None), ("shards", str(shards))):
        task, _ = TextTask.prepare(configs["text"], configs["model"], data)
        batches = task.batches("train", torch.Generator().manual_seed(0), 12)
        next(batches)
        t = time.perf_counter()
        for _ in range(n):
            next(batches)
        out[name] = (time.perf_counter() - t) / n * 1e6
    return out


def training_rates(shards: Path, steps: int, block: int = 25) -> dict:
    """Training tokens/s of the shakespeare-char preset fed from memory and from shards: one
    model each (same seed, same AdamW), trained in rotating blocks of `block` steps."""
    import torch

    from monotile.modalities.text import TextTask
    from monotile.presets import PRESETS
    from monotile.run import build_configs
    from monotile.train.optim import make_optimizer
    configs = build_configs("text", PRESETS["shakespeare-char"])
    tc, runs = configs["train"], {}
    for name, data in (("memory", None), ("shards", str(shards))):
        task, cfg = TextTask.prepare(configs["text"], configs["model"], data)
        torch.manual_seed(tc.seed)
        model = task.build_model(cfg)
        runs[name] = {"task": task, "model": model, "seconds": 0.0, "tokens": 0,
                      "opt": make_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay,
                                            beta1=tc.beta1, beta2=tc.beta2),
                      "batches": task.batches("train", torch.Generator().manual_seed(tc.seed),
                                              tc.batch_size)}
    done, names = 0, list(runs)
    while done < steps:
        n = min(block, steps - done)
        for name in names if (done // block) % 2 == 0 else names[::-1]:
            r, t = runs[name], time.perf_counter()
            for _ in range(n):
                batch = next(r["batches"])
                r["task"].loss(r["model"], batch).backward()
                r["opt"].step()
                r["opt"].zero_grad(set_to_none=True)
                r["tokens"] += r["task"].tokens(batch)
            r["seconds"] += time.perf_counter() - t
        done += n
    return {name: r["tokens"] / r["seconds"] for name, r in runs.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="2GB", help="synthetic corpus size (default 2GB)")
    ap.add_argument("--workers", type=int, default=None, help="prepare's processes "
                    "(default: one per core)")
    ap.add_argument("--steps", type=int, default=200, help="training steps of (c)")
    ap.add_argument("--keep", help="a folder to work in and keep (default: a temporary one)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    mono = [sys.executable, "-m", "monotile"]
    workers = ["--workers", str(a.workers)] if a.workers else []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        (work / "corpus").mkdir(exist_ok=True)
        speeches = find_data("speeches/speeches_public_domain.txt").read_text(encoding="utf-8")
        tok = Tokenizer.train_bpe(speeches, 4096)
        tok.tok.add_special_tokens(["<|endoftext|>"])
        tok.save(work / "bpe.json")
        t = time.perf_counter()
        files = make_corpus(work / "corpus", parse_size(a.size))
        made_s, size = time.perf_counter() - t, sum(f.stat().st_size for f in files)

        # (a) and (b): prepare, between two runs of tokenizers' own batch encode (the faster
        # one is the reference: a noisy machine does not flatter prepare)
        base = baseline_encode(files, work / "bpe.json")
        prep = measure([*mono, "prepare", "text", "--data", str(work / "corpus"), "--tokenizer",
                        str(work / "bpe.json"), "--out", str(work / "shards"), "--quiet",
                        "--json", *workers])
        figures = json.loads(prep["stdout"])
        base = min(base, baseline_encode(files, work / "bpe.json"), key=lambda r: r["seconds"])
        run = work / "run-shards"
        train = measure([*mono, "train", "text", "--data", str(work / "shards"), "--preset",
                         "speeches-bpe", "--out", str(run), "--quiet", "--set", "max_steps=100",
                         "log_interval=1", "eval_interval=100", "eval_tokens=20000"],
                        first_step=run / "metrics.jsonl")

        # (c): the shakespeare-char preset from shards and from memory
        text = find_data("tinyshakespeare/input.txt")
        Tokenizer.train_char(text.read_text(encoding="utf-8")).save(work / "char.json")
        subprocess.run([*mono, "prepare", "text", "--data", str(text), "--tokenizer",
                        str(work / "char.json"), "--out", str(work / "shakespeare"), "--quiet",
                        "--val-fraction", "0.1"], check=True, capture_output=True)
        rates = training_rates(work / "shakespeare", a.steps)
        draw = batch_draw_us(work / "shakespeare")

    result = {
        "corpus": {"bytes": size, "files": len(files), "made_s": round(made_s, 1)},
        "prepare": {"mb_per_s": figures["mb_per_s"], "seconds": round(prep["seconds"], 1),
                    "tokens": figures["train_tokens"] + figures["val_tokens"],
                    "shards": figures["train_shards"] + figures["val_shards"],
                    "peak_pss_mb": round(prep["peak_pss_mb"]),
                    "peak_process_mb": round(prep["peak_process_mb"])},
        "tokenizers_encode_batch": {"mb_per_s": round(base["mb_per_s"], 2),
                                    "seconds": round(base["seconds"], 1)},
        "prepare_vs_encode_batch": round(figures["mb_per_s"] / base["mb_per_s"], 2),
        "train_from_shards": {"peak_pss_mb": round(train["peak_pss_mb"]),
                              "first_step_s": round(train["first_step_s"] or -1, 1),
                              "seconds": round(train["seconds"], 1)},
        "shakespeare_char_tokens_per_s": {k: round(v) for k, v in rates.items()},
        "shards_vs_memory": round(rates["shards"] / rates["memory"], 3),
        "batch_draw_us": {k: round(v, 1) for k, v in draw.items()},
        "workers": a.workers or len(os.sched_getaffinity(0)),
    }
    if a.json:
        print(json.dumps(result))
        return
    c, p, b, tr = (result[k] for k in ("corpus", "prepare", "tokenizers_encode_batch",
                                       "train_from_shards"))
    print(f"corpus: {c['bytes'] / 1e6:,.0f} MB in {c['files']} files (made in {c['made_s']} s)")
    print(f"(a) prepare ({result['workers']} workers): {p['mb_per_s']:.1f} MB/s, "
          f"{p['tokens']:,} tokens in {p['shards']} shards in {p['seconds']} s; tokenizers "
          f"encode_batch alone: {b['mb_per_s']:.1f} MB/s; ratio "
          f"{result['prepare_vs_encode_batch']:.2f}x")
    print(f"(b) peak memory (PSS of all processes): prepare {p['peak_pss_mb']:,} MB (largest "
          f"process {p['peak_process_mb']:,} MB RSS), train from shards {tr['peak_pss_mb']:,} "
          f"MB; first step {tr['first_step_s']} s after the command started")
    r = result["shakespeare_char_tokens_per_s"]
    print(f"(c) shakespeare-char, {a.steps} steps: {r['memory']:,} tokens/s in memory, "
          f"{r['shards']:,} from shards ({result['shards_vs_memory']:.3f}x); a batch drawn in "
          f"{draw['memory']:.0f} us from memory, {draw['shards']:.0f} us from shards")


if __name__ == "__main__":
    main()
