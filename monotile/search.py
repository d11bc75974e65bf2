"""Semantic search: documents and a query embedded by an encoder run, ranked by cosine.

    score(q, d) = e_q . e_d        (both unit length, so this is their cosine)

DOCS is a text file (one document per line) or a folder of .txt/.md files (one document per
file). Their embeddings are kept next to them (`DOCS.monotile-index.safetensors`, or
`.monotile-index.safetensors` inside the folder) with a fingerprint of the documents and of the
model's weights file (path, size, modification time), and reused until either changes.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import torch

from .errors import DataError
from .rundir import weights_path
from .train.checkpoint import load_tensors, save_tensors

SUFFIXES = (".txt", ".md")


def read_documents(docs: Path) -> list[tuple[str, str]]:
    """(where, text) per document: "file:line" for the lines of a file, the path for a folder's
    files. Empty lines and files are skipped."""
    docs = Path(docs)
    if docs.is_file():
        lines = docs.read_text(encoding="utf-8", errors="replace").splitlines()
        found = [(f"{docs.name}:{n}", line.strip()) for n, line in enumerate(lines, 1)
                 if line.strip()]
    elif docs.is_dir():
        files = sorted(p for p in docs.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
        found = [(str(p.relative_to(docs)), p.read_text(encoding="utf-8", errors="replace")
                  .strip()) for p in files]
        found = [(where, text) for where, text in found if text]
    else:
        raise DataError(f"--index {docs} does not exist; give a text file (one document per "
                        "line) or a folder of .txt files")
    if not found:
        raise DataError(f"--index {docs} holds no text to search")
    return found


def index_path(docs: Path) -> Path:
    docs = Path(docs)
    return docs / ".monotile-index.safetensors" if docs.is_dir() else \
        docs.with_name(docs.name + ".monotile-index.safetensors")


def fingerprint(documents: list[tuple[str, str]], model_id: str) -> str:
    h = hashlib.sha256(model_id.encode())
    for where, text in documents:
        h.update(where.encode() + b"\0" + text.encode() + b"\0")
    return h.hexdigest()


def document_embeddings(run, docs: Path, model_id: str):
    """The documents and their (N, d) embeddings: from the index when it is current, else
    computed and stored. Returns (documents, embeddings, reused)."""
    documents = read_documents(docs)
    key = fingerprint(documents, model_id)
    path = index_path(docs)
    if path.is_file():
        try:
            tensors, meta = load_tensors(path)
            if meta.get("fingerprint") == key:
                return documents, tensors["embeddings"], True
        except Exception:  # a damaged index is rebuilt
            pass
    vectors = run.embed([text for _, text in documents], progress=True)  # a bar on a terminal
    try:
        save_tensors(path, {"embeddings": vectors},
                     {"fingerprint": key, "documents": str(len(documents))})
    except OSError as e:
        warnings.warn(f"could not store the index at {path} ({e}); it is recomputed next time",
                      stacklevel=2)
    return documents, vectors, False


def search(run, docs: str | Path, query: str, top_k: int = 5) -> dict:
    """The top_k documents for `query` with their scores, best first."""
    if top_k <= 0:
        raise DataError(f"--top-k {top_k} is invalid: give a positive number")
    # the weights file's path, size and modification time name the model: hashing its bytes
    # on every query would read the whole model a second time
    weights = weights_path(run.dir, run.train_config).resolve()
    stat = weights.stat()
    model_id = f"{weights}:{stat.st_size}:{stat.st_mtime_ns}"
    documents, vectors, reused = document_embeddings(run, Path(docs), model_id)
    q = run.embed([query])[0]
    scores = vectors @ q
    best = torch.topk(scores, min(top_k, len(documents)))
    return {"query": query, "documents": len(documents), "index_reused": reused,
            "results": [{"score": float(s), "where": documents[i][0], "text": documents[i][1]}
                        for s, i in zip(best.values.tolist(), best.indices.tolist())]}
