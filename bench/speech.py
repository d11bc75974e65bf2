"""The fsdd preset in full, on the official split and on each held-out speaker, and its speed.

    .venv/bin/python bench/speech.py [--speakers all|none|NAME ...] [--jobs N] [--out DIR]
                                     [--set K=V ...]

official split (index 0-4 of every speaker): word accuracy >= 99 %.
held-out speakers (train on five, test on all 500 recordings of the sixth): target >= 85 %
    mean word accuracy over the six.
speed: training recordings/s of the fsdd preset, and the real-time factor of `predict`
    (seconds of compute per second of audio) on the 300 test recordings, greedy and with a
    closed-vocabulary beam search; the hand-written CTC loss against torch's own kernel on the
    same batch.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import monotile
from monotile.data import find_data
from monotile.infer.ctc import ctc_loss
from monotile.modalities.speech_io import FSDD_WORDS

SPEAKERS = ["george", "jackson", "lucas", "nicolas", "theo", "yweweler"]


def word_accuracy(figures: dict) -> float:
    return 1.0 - figures["wer"]


def ctc_speed(run, batches: int = 20) -> tuple[float, float]:
    """ms per forward + backward of our CTC loss and of F.ctc_loss on the same real batches."""
    task, model = run.task, run.model
    rng = torch.Generator().manual_seed(0)
    it = task.batches("train", rng, run.train_config.batch_size)
    data = []
    with torch.no_grad():
        for _ in range(batches):
            b = next(it)
            lp, n = model(b["frames"], b["lengths"])
            data.append((lp, n, b["targets"], b["target_lengths"]))
    times = {"ours": 0.0, "torch": 0.0}
    for lp, n, y, m in data:
        for name in ("ours", "torch"):
            x = lp.detach().requires_grad_()
            t = time.perf_counter()
            if name == "ours":
                loss = ctc_loss(x, y, n, m, zero_infinity=True)
            else:
                loss = F.ctc_loss(x.transpose(0, 1), y, n, m, zero_infinity=True)
            loss.backward()
            times[name] += time.perf_counter() - t
    return times["ours"] / batches * 1000, times["torch"] / batches * 1000


def holdout(job) -> dict:
    """Train on five speakers and test on the sixth."""
    speaker, out, overrides, jobs = job
    if jobs > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs))
    r = monotile.train("speech", "fsdd", out=out, quiet=True,
                       overrides=dict(overrides, holdout_speaker=speaker))
    return {**r.state["last_eval"], "train_seconds": r.state["elapsed_s"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speakers", nargs="+", default=["all"])
    ap.add_argument("--out", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--set", nargs="*", action="extend", default=[], dest="overrides",
                    metavar="KEY=VALUE")
    ap.add_argument("--jobs", type=int, default=1, help="held-out speakers trained at once "
                    "(their train times then share the cores)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="monotile-bench-"))
    overrides = dict(s.split("=", 1) for s in a.overrides)
    speakers = (SPEAKERS if a.speakers == ["all"] else [] if a.speakers == ["none"]
                else a.speakers)
    results: dict = {}

    t = time.perf_counter()
    run = monotile.train("speech", "fsdd", out=out / "fsdd", quiet=True, overrides=overrides)
    wall = time.perf_counter() - t
    steps, batch = run.state["step"], run.train_config.batch_size
    results["official"] = {**run.state["last_eval"], "train_seconds": run.state["elapsed_s"],
                           "wall_seconds": wall, "parameters": run.parameters(),
                           "recordings_per_s": steps * batch / run.state["elapsed_s"]}
    loaded = monotile.load(run.dir)
    test = sorted(p for p in find_data("fsdd/recordings").glob("*.wav")
                  if int(p.stem.split("_")[2]) < 5)
    truth = [FSDD_WORDS[int(p.name[0])] for p in test]
    words = list(loaded.task.config.words)
    for name, options in (("greedy", dict(method="greedy")),
                          ("beam8_words", dict(method="beam", beam_width=8, words=words))):
        t = time.perf_counter()
        preds = loaded.predict(test, **options)["predictions"]
        seconds = time.perf_counter() - t
        audio_s = sum(p["duration"] for p in preds)
        results["official"][f"rtf_{name}"] = seconds / audio_s
        results["official"][f"predict_accuracy_{name}"] = statistics.mean(
            p["text"] == w for p, w in zip(preds, truth))
    ours, ref = ctc_speed(loaded)
    results["official"]["ctc_ms_ours"], results["official"]["ctc_ms_torch"] = ours, ref

    jobs = [(speaker, str(out / f"holdout-{speaker}"), overrides, a.jobs) for speaker in speakers]
    if a.jobs > 1:  # one process per held-out speaker, the cores shared out between them
        import multiprocessing
        with multiprocessing.get_context("spawn").Pool(a.jobs) as pool:
            done = pool.map(holdout, jobs)
    else:
        done = [holdout(job) for job in jobs]
    results.update(dict(zip(speakers, done)))

    if a.json:
        print(json.dumps(results))
        return
    o = results["official"]
    print(f"fsdd official split: {o['parameters']:,} parameters, word accuracy "
          f"{word_accuracy(o):.2%} (WER {o['wer']:.2%}, CER {o['cer']:.2%}) on "
          f"{o['test_utterances']} recordings; train {o['train_seconds']:.0f} s "
          f"({o['recordings_per_s']:.0f} recordings/s); bar >= 99 %: "
          f"{'met' if word_accuracy(o) >= 0.99 else 'NOT met'}")
    print(f"predict on the 300 test files ({audio_s:.0f} s of audio): real-time factor "
          f"{o['rtf_greedy']:.4f} greedy ({o['predict_accuracy_greedy']:.2%} right), "
          f"{o['rtf_beam8_words']:.4f} beam 8 in the closed vocabulary "
          f"({o['predict_accuracy_beam8_words']:.2%} right)")
    print(f"CTC loss forward+backward per training batch: monotile {ours:.1f} ms, "
          f"torch.nn.functional.ctc_loss {ref:.1f} ms ({ours / ref:.1f}x)")
    if speakers:
        accs = [word_accuracy(results[s]) for s in speakers]
        for s in speakers:
            print(f"  held out {s:<9} word accuracy {word_accuracy(results[s]):.2%} "
                  f"(train {results[s]['train_seconds']:.0f} s)")
        mean = statistics.mean(accs)
        print(f"held-out speakers: mean word accuracy {mean:.2%} over {len(accs)}; target >= "
              f"85 %: {'met' if mean >= 0.85 and len(accs) == 6 else 'NOT met'}")


if __name__ == "__main__":
    main()
