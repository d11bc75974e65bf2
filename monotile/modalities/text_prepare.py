"""`monotile prepare text`: a corpus of .txt, .jsonl and .parquet files tokenized once, in
worker processes, into token shards (text_shards.py says what a folder of them holds).

Each document becomes ids = encode(document) + [eot], eot the tokenizer's end-of-text token
(<|endoftext|>, <|end_of_text|>, </s> or <eos>; with none, documents are joined as they are).
A document goes to "val" when h(seed, file, position) < val_fraction, h = BLAKE2b-64 of the
three read as a fraction of 2^64: by document, seeded, the same whatever the workers (nanoGPT
holds out 0.0005 of OpenWebText's documents, seed 2357; so do these defaults). What a document
is in each kind of file: text_sources.py.

Resuming: files are read in fixed pieces, so the ids are a function of the files alone. Each
time a shard is finished, index.json records it, how far each file was read and the ids of
the unfinished shards so far (their count and SHA-256); a rerun keeps what it records,
truncates the unfinished shards to it and reads on from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from ..tokenizers import Tokenizer
from ..train.checkpoint import atomic_write, atomic_write_json, atomic_write_text
from .text_shards import FORMAT, INDEX, SPLITS, VERSION, file_sha256, shard_dtype, verify
from .text_sources import BLOCK, Piece, Source, documents, find_sources, parquet_file, pieces

END_TOKENS = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


@dataclass
class Encoded:
    piece: Piece
    ids: dict = field(default_factory=dict)       # split -> the ids of its documents, joined
    lengths: dict = field(default_factory=dict)   # split -> ids per document
    text_bytes: int = 0
    dropped: int = 0                              # characters a character vocabulary lacks


def end_token(tok: Tokenizer) -> int | None:
    """The id of the tokenizer's end-of-text token, or None if it has none."""
    vocab = tok.tok.get_vocab()
    return next((vocab[t] for t in END_TOKENS if t in vocab), None)


def load_tokenizer(where) -> tuple[Tokenizer, Path]:
    """A run directory's tokenizer.json or a tokenizer.json file, and its path."""
    path = Path(where).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"--tokenizer {where}: no tokenizer.json there; give a text run "
                        "directory or a tokenizer.json file (e.g. from `monotile import hf`)")
    return Tokenizer.load(path), path


# ---- encoding, in the workers ---------------------------------------------------------------

_worker: dict = {}


def _start_worker(setup: dict, interruptible: bool = False) -> None:
    """Each worker's own tokenizer (from its JSON); Ctrl-C reaches the main process alone,
    and a worker whose main process died (kill -9) exits too."""
    if not interruptible:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
        threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    from tokenizers import Tokenizer as HFTokenizer
    _worker.update(setup, tok=HFTokenizer.from_str(setup["tokenizer"]))


def _exit_with_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1)
    os._exit(1)


def held_out(seed: int, name: str, position: int, fraction: float) -> bool:
    """Whether the document at `position` of file `name` is a validation document."""
    h = hashlib.blake2b(f"{seed}:{name}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") < fraction * 2.0 ** 64


def encode_piece(piece: Piece) -> Encoded:
    """The ids of a piece's documents, in order, split into train and val."""
    w = _worker
    src = w["sources"][piece.source]
    docs = documents(piece, src, w["column"])
    text_bytes = (len(piece.data) if src.kind == "txt" else
                  sum(len(t.encode("utf-8")) for _, t in docs))
    out = Encoded(dataclasses.replace(piece, data=None), text_bytes=text_bytes)
    chosen = {split: ([], []) for split in SPLITS}
    eot, dtype = w["eot"], np.dtype(w["dtype"])
    for (position, text), ids in zip(docs, _ids(w["tok"], [t for _, t in docs])):
        if w["char"]:
            out.dropped += len(text) - len(ids)
        if eot is not None and (not ids or ids[-1] != eot):
            ids = [*ids, eot]
        if ids:
            split = "val" if held_out(w["seed"], src.name, position, w["val_fraction"]) \
                else "train"
            chosen[split][0].append(np.asarray(ids, dtype=dtype))
            chosen[split][1].append(len(ids))
    for split, (ids, lengths) in chosen.items():
        out.ids[split] = np.concatenate(ids) if ids else np.empty(0, dtype)
        out.lengths[split] = np.asarray(lengths, dtype=np.int64)
    return out


def _ids(tok, texts: list[str], batch_chars: int = 1 << 20):
    """Each text's ids, encoded in batches of about `batch_chars` characters (a tokenizer's
    Encoding holds offsets and strings per token: a whole piece at once is ~40x its text)."""
    batch, size = [], 0
    for text in [*texts, None]:
        if batch and (text is None or size + len(text) > batch_chars):
            yield from (e.ids for e in tok.encode_batch(batch, add_special_tokens=True))
            batch, size = [], 0
        if text is not None:
            batch.append(text)
            size += len(text)


def _encoded(work, setup: dict, workers: int):
    """encode_piece of each piece, in order, on `workers` processes with at most two pieces
    each waiting (memory stays flat); in this process when workers is 1."""
    if workers == 1:
        _start_worker(setup, interruptible=True)
        yield from map(encode_piece, work)
        return
    methods = multiprocessing.get_all_start_methods()
    mp = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with mp.Pool(workers, _start_worker, (setup,)) as pool:
        pending: deque = deque()
        for piece in work:
            pending.append(pool.apply_async(encode_piece, (piece,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


# ---- writing: shards that grow, then are renamed whole --------------------------------------

class SplitWriter:
    """One split's ids cut into shards of `size`: a shard grows in a hidden .part file, renamed
    SPLIT-NNNNN.bin once full (fsync'd, its document starts written beside it first)."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, size: int,
                 shards: list[dict], partial: dict | None):
        self.folder, self.split, self.dtype, self.size = folder, split, dtype, size
        self.shards = shards
        self.hash, self.tokens, self.starts = hashlib.sha256(), 0, []
        part = self.part_path
        if partial and partial["tokens"]:
            self._restore(partial)
        else:
            part.write_bytes(b"")
        self.file = open(part, "ab")

    @property
    def name(self) -> str:
        return f"{self.split}-{len(self.shards):05d}"

    @property
    def part_path(self) -> Path:
        return self.folder / f".{self.name}.bin.part"

    def _restore(self, partial: dict) -> None:
        """The unfinished shard as index.json recorded it: its .part (or the .bin it became
        after the record, before the next one) cut back to the ids recorded."""
        n = partial["tokens"] * self.dtype.itemsize
        for path in (self.part_path, self.folder / f"{self.name}.bin"):
            if path.is_file() and path.stat().st_size >= n:
                with open(path, "rb") as f:
                    head = f.read(n)
                if hashlib.sha256(head).hexdigest() == partial["sha256"]:
                    os.replace(path, self.part_path)
                    os.truncate(self.part_path, n)
                    self.hash.update(head)
                    self.tokens, self.starts = partial["tokens"], list(partial["starts"])
                    return
        raise DataError(f"the unfinished shard {self.part_path} does not match "
                        f"{self.folder / INDEX}; delete {self.folder} and prepare again")

    def write(self, ids: np.ndarray, lengths: np.ndarray) -> bool:
        """Append a piece's ids (documents of `lengths` ids); True if a shard was finished."""
        starts = np.concatenate(([0], np.cumsum(lengths)[:-1])) if len(lengths) else lengths
        done, finished = 0, False
        while done < len(ids):
            take = min(self.size - self.tokens, len(ids) - done)
            chunk = ids[done:done + take]
            self.file.write(chunk.tobytes())
            self.hash.update(chunk.tobytes())
            here = starts[(starts >= done) & (starts < done + take)]
            self.starts += (here - done + self.tokens).tolist()
            self.tokens += take
            done += take
            if self.tokens == self.size:
                self._finish()
                finished = True
        return finished

    def _finish(self) -> None:
        buf = io.BytesIO()
        np.save(buf, np.asarray(self.starts, dtype=np.int64), allow_pickle=False)
        starts = f"{self.name}.starts.npy"
        atomic_write(self.folder / starts, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.part_path, self.folder / f"{self.name}.bin")
        self.shards.append({"file": f"{self.name}.bin", "tokens": self.tokens,
                            "sha256": self.hash.hexdigest(), "documents": len(self.starts),
                            "starts": starts,
                            "starts_sha256": hashlib.sha256(buf.getvalue()).hexdigest()})
        self.hash, self.tokens, self.starts = hashlib.sha256(), 0, []
        self.file = open(self.part_path, "wb")

    def record(self) -> dict:
        """The unfinished shard, made durable: what a rerun keeps of it."""
        self.file.flush()
        os.fsync(self.file.fileno())
        return {"tokens": self.tokens, "sha256": self.hash.copy().hexdigest(),
                "starts": list(self.starts)}

    def close(self) -> None:
        """Finish the last, shorter shard (if it holds any ids)."""
        if self.tokens:
            self._finish()
        self.file.close()
        self.part_path.unlink(missing_ok=True)


# ---- the command ----------------------------------------------------------------------------

@contextlib.contextmanager
def _folder_lock(folder: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no lock
        yield
        return
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DataError(f"{folder} is being prepared by another process; wait for it, or "
                            "stop it and run the command again to continue") from None
        yield
    finally:
        os.close(fd)


def _settings(sources, tok_path: Path, shard_tokens, val_fraction, seed, column) -> dict:
    return {"shard_tokens": shard_tokens, "val_fraction": val_fraction, "seed": seed,
            "column": column, "block_bytes": BLOCK, "tokenizer_sha256": file_sha256(tok_path),
            "sources": [{"path": str(s.path), "name": s.name, "size": s.path.stat().st_size,
                         "mtime_ns": s.path.stat().st_mtime_ns} for s in sources]}


def _check_same(out: Path, index: dict, settings: dict) -> None:
    for key, value in settings.items():
        if index.get("settings", {}).get(key) != value:
            was = index.get("settings", {}).get(key)
            what = ("its sources differ (a file was added, removed or changed since)"
                    if key == "sources" else f"{key} was {was!r}, now {value!r}")
            raise ConfigError(f"{out} holds shards prepared otherwise: {what}; give the same "
                              "arguments to continue them, or another --out")


def prepare_shards(inputs: list, tokenizer, out, *, shard_tokens: int = 100_000_000,
                   val_fraction: float = 0.0005, seed: int = 2357, column: str = "text",
                   workers: int | None = None, progress: bool = False) -> dict:
    """Tokenize the files or folders `inputs` with `tokenizer` (a run directory or a
    tokenizer.json) into shards in folder `out`; a stopped call continues where it stopped,
    and a finished folder is verified (its checksums) and left as it is. Returns figures."""
    if shard_tokens < 1:
        raise ConfigError(f"--shard-tokens {shard_tokens} is invalid: give a positive count")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction} is invalid: it must be in [0, 1)")
    if workers is None:
        workers = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else os.cpu_count() or 1)
    if workers < 1:
        raise ConfigError(f"--workers {workers} is invalid: give at least 1")
    sources = find_sources(list(inputs))
    tok, tok_path = load_tokenizer(tokenizer)
    for src in sources:
        if src.kind == "parquet":
            parquet_file(src.path, column)  # no pyarrow, no such column: said before work
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the shards")
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(sources, tok_path, shard_tokens, val_fraction, seed, column)
    with _folder_lock(out):
        index = _started(out, settings)
        if index is None:  # nothing finished yet (or nothing there): start afresh
            if any(not p.name.startswith(".") for p in out.iterdir()
                   if p.name not in (INDEX, "tokenizer.json")):
                raise ConfigError(f"--out {out} is not empty and holds no {INDEX}; give a new "
                                  "or empty folder")
            index = _new_index(tok, settings, sources)
            atomic_write_json(out / INDEX, index)
        elif index["complete"]:
            checked = verify(out, index)
            return dict(_figures(out, index), already=True, verified_shards=checked)
        return _run(out, index, sources, tok, tok_path, workers, progress)


def _started(out: Path, settings: dict) -> dict | None:
    """The index of a prepare into `out` that finished shards (all of them, or some before
    it stopped) with these settings; None if none did; ConfigError if it had others."""
    if not (out / INDEX).is_file():
        return None
    try:
        index = json.loads((out / INDEX).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        index = None
    if not isinstance(index, dict) or index.get("format") != FORMAT or \
            index.get("version") != VERSION:
        raise ConfigError(f"{out / INDEX} is not an index of this shard format; give another "
                          "--out")
    if not index["complete"] and not any(index["splits"][s]["shards"] for s in SPLITS):
        return None
    _check_same(out, index, settings)
    return index


def _new_index(tok: Tokenizer, settings: dict, sources: list[Source]) -> dict:
    bound = max(tok.vocab_size, max(tok.tok.get_vocab().values(), default=0) + 1)
    return {"format": FORMAT, "version": VERSION, "complete": False,
            "dtype": shard_dtype(bound).name, "byte_order": "little", "vocab_size": bound,
            "tokenizer": "tokenizer.json", "tokenizer_kind": tok.kind, "eot_id": end_token(tok),
            "documents_are": "txt: paragraphs; jsonl: records; parquet: rows",
            "settings": settings,
            "progress": [{"read": 0, "line": 0, "done": False} for _ in sources],
            "splits": {s: {"tokens": 0, "documents": 0, "shards": []} for s in SPLITS},
            "text_bytes": 0, "dropped_characters": 0,
            "unfinished": {s: None for s in SPLITS}}


def _run(out, index, sources, tok, tok_path, workers, progress) -> dict:
    from tqdm.auto import tqdm
    tok_text = tok_path.read_text(encoding="utf-8")
    if not (out / "tokenizer.json").is_file() or \
            file_sha256(out / "tokenizer.json") != index["settings"]["tokenizer_sha256"]:
        atomic_write_text(out / "tokenizer.json", tok_text)
    resumed = any(p["read"] for p in index["progress"]) or any(
        index["splits"][s]["shards"] for s in SPLITS)
    verify_finished(out, index)
    dtype = np.dtype(index["dtype"])
    size = index["settings"]["shard_tokens"]
    writers = {s: SplitWriter(out, s, dtype, size, index["splits"][s]["shards"],
                              index["unfinished"][s]) for s in SPLITS}
    setup = {"tokenizer": tok.tok.to_str(), "eot": index["eot_id"], "dtype": dtype.str,
             "seed": index["settings"]["seed"], "val_fraction": index["settings"]["val_fraction"],
             "column": index["settings"]["column"], "char": tok.kind == "char",
             "sources": sources}
    total = sum(s.path.stat().st_size for s in sources)
    done_bytes = sum(s.path.stat().st_size for s, p in zip(sources, index["progress"])
                     if p["done"]) + sum(p["read"] for s, p in zip(sources, index["progress"])
                                         if not p["done"] and s.kind != "parquet")
    work = pieces(sources, index["progress"], index["settings"]["column"])
    t0, text_bytes = time.perf_counter(), 0
    with contextlib.ExitStack() as stack:
        # however it ends (an error in a file, Ctrl-C), no shard file is left open
        stack.callback(lambda: [w.file.close() for w in writers.values()])
        bar = stack.enter_context(tqdm(total=total, initial=done_bytes, unit="B",
                                       unit_scale=True, desc="prepare", dynamic_ncols=True,
                                       disable=None if progress else True))  # None: a tty
        for enc in _encoded(work, setup, workers):
            finished = False
            for split, writer in writers.items():
                finished |= writer.write(enc.ids[split], enc.lengths[split])
                index["splits"][split]["documents"] += len(enc.lengths[split])
                index["splits"][split]["tokens"] += len(enc.ids[split])
            piece = enc.piece
            state = index["progress"][piece.source]
            state.update(read=piece.end, line=piece.next_first, done=piece.last)
            index["text_bytes"] += enc.text_bytes
            index["dropped_characters"] += enc.dropped
            text_bytes += enc.text_bytes
            bar.update(piece.file_bytes)
            if finished:  # a checkpoint: finished shards, the unfinished ones, the files' read
                index["unfinished"] = {s: w.record() for s, w in writers.items()}
                atomic_write_json(out / INDEX, index)
        for writer in writers.values():
            writer.close()
    for state in index["progress"]:  # empty files too
        state["done"] = True
    seconds = time.perf_counter() - t0
    if not index["splits"]["train"]["tokens"]:
        raise DataError(f"no text in {', '.join(str(s.path) for s in sources[:3])}: there are "
                        "no documents to prepare")
    index["complete"], index["unfinished"] = True, {s: None for s in SPLITS}
    atomic_write_json(out / INDEX, index)
    for leftover in out.glob(".*"):  # parts and temporary files a kill left behind
        if leftover.name.endswith(".part") or ".tmp" in leftover.name:
            leftover.unlink(missing_ok=True)
    return dict(_figures(out, index), already=False, resumed=resumed,
                seconds=round(seconds, 2),
                mb_per_s=round(text_bytes / 1e6 / seconds, 2) if seconds > 0 else None)


def verify_finished(out: Path, index: dict) -> None:
    """The shards a stopped prepare finished, checked against their SHA-256 before it goes on."""
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            path = out / shard["file"]
            if not path.is_file() or file_sha256(path) != shard["sha256"]:
                raise DataError(f"{path}, finished before the prepare stopped, differs from "
                                f"its SHA-256 in {out / INDEX}; delete {out} and prepare again")


def _figures(out: Path, index: dict) -> dict:
    splits = index["splits"]
    return {"out": str(out), "dtype": index["dtype"], "vocab_size": index["vocab_size"],
            "eot_id": index["eot_id"],
            **{f"{s}_tokens": splits[s]["tokens"] for s in SPLITS},
            **{f"{s}_shards": len(splits[s]["shards"]) for s in SPLITS},
            **{f"{s}_documents": splits[s]["documents"] for s in SPLITS},
            "text_bytes": index["text_bytes"],
            "dropped_characters": index["dropped_characters"],
            "sources": len(index["settings"]["sources"])}
