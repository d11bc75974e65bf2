"""Adapting trained models with LoRA, on real data, with the base model as the reference.

1. text: the shakespeare-char preset (trained here, or --text-run) adapted to the public-domain
   speeches; validation loss on held-out speeches before (the base) and after.
2. chat: the same base taught to answer in turn on Tiny Shakespeare's dialogues (a speech as the
   user's message, the reply as the answer; pairs of at most 56 characters, so that prompt and
   answer fit the 64-token context), loss on the answers only, before and after, and a sample.
3. images: the mnist preset (a short run of it, or --mnist-run) adapted to scikit-learn's 8x8
   digits upscaled to 28x28; test accuracy before and after.

    .venv/bin/python bench/finetune.py [--out DIR] [--text-run RUN] [--mnist-run RUN] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import monotile
from monotile.data import find_data
from monotile.modalities.chat import dialogues_from_script


def adapt(base, data, out, **options) -> dict:
    t = time.perf_counter()
    run = monotile.finetune(base, data, out=out, quiet=True, **options)
    metric = "accuracy" if "accuracy" in run.state["base_eval"] else "val_loss"
    return {"metric": metric, "before": run.state["base_eval"][metric],
            "after": run.state["last_eval"][metric], "parameters": run.parameters(),
            "trainable": run.state["trainable_parameters"],
            "seconds": round(time.perf_counter() - t, 1), "run": str(run.dir)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="where the runs go (default: a temporary folder)")
    ap.add_argument("--text-run", help="a trained shakespeare-char run to adapt")
    ap.add_argument("--mnist-run", help="a trained mnist run to adapt")
    ap.add_argument("--only", nargs="+", choices=["text", "chat", "images"],
                    default=["text", "chat", "images"])
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    out = Path(a.out or tempfile.mkdtemp(prefix="bench_finetune_"))
    out.mkdir(parents=True, exist_ok=True)
    results = {}

    text_base = None
    if {"text", "chat"} & set(a.only):
        text_base = a.text_run or monotile.train("text", "shakespeare-char", out=out / "base",
                                                 quiet=True).dir
    speeches = find_data("speeches/speeches_public_domain.txt")
    if "text" in a.only:
        results["text"] = adapt(text_base, speeches, out / "speeches-lora", rank=8,
                                overrides={"max_steps": "1000", "eval_interval": "500",
                                           "warmup_steps": "50", "eval_tokens": "100000"})

    if "chat" in a.only:
        script = find_data("tinyshakespeare/input.txt").read_text(encoding="utf-8")
        records = dialogues_from_script(script, max_chars=56)
        chat = out / "dialogues.jsonl"
        chat.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        # ~500 short records overfit within a few epochs: a gentler rate, fewer steps
        results["chat"] = adapt(text_base, chat, out / "chat-lora", rank=8,
                                overrides={"max_steps": "300", "eval_interval": "100",
                                           "warmup_steps": "20", "lr": "3e-4"})
        results["chat"]["records"] = len(records)
        answer = monotile.load(out / "chat-lora").chat(
            [{"role": "user", "content": "Who comes here?"}], max_new_tokens=60,
            temperature=0.8, seed=0)
        results["chat"]["sample"] = {"user": "Who comes here?", "assistant": answer}

    if "images" in a.only:
        mnist_base = a.mnist_run or monotile.train(
            "vision", "mnist", out=out / "mnist", quiet=True,
            overrides={"max_steps": "700", "eval_interval": "700"}).dir
        results["images"] = adapt(mnist_base, "digits", out / "digits-lora", rank=8,
                                  overrides={"max_steps": "300", "eval_interval": "100",
                                             "warmup_steps": "30", "lr": "1e-3"})

    if a.json:
        print(json.dumps(results))
        return
    for name, r in results.items():
        print(f"{name}: {r['metric']} {r['before']:.4f} (base) -> {r['after']:.4f} (LoRA), "
              f"{r['trainable']:,} of {r['parameters']:,} parameters trained, {r['seconds']} s")
    if "chat" in results:
        s = results["chat"]["sample"]
        print(f"chat sample ({results['chat']['records']} records):\n  USER: {s['user']}\n"
              f"  ASSISTANT: {s['assistant']!r}")


if __name__ == "__main__":
    main()
