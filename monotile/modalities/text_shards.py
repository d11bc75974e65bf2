"""Token shards: a corpus tokenized once (text_prepare.py) and read memory-mapped, never whole.

A folder of shards holds index.json, tokenizer.json and, per split ("train", "val"), files
SPLIT-00000.bin (raw little-endian uint16 ids when the vocabulary fits 65,536, else uint32) of
`shard_tokens` ids each (the last one shorter), with SPLIT-00000.starts.npy beside each: the
offsets in that shard where a document starts. index.json names each file with its ids and
SHA-256, the tokenizer, the settings and the sources.

Training windows: x = s_k[o : o+T], y = s_k[o+1 : o+T+1], with i ~ U{0, ..., sum_k (n_k - T) - 1}
and (k, o) the shard and offset where sum_{j<k} (n_j - T) <= i: a window never crosses a shard's
end (the last T ids of each shard start no window; with one shard this is nanoGPT's draw).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import DataError

FORMAT, VERSION = "monotile-token-shards", 1
INDEX = "index.json"
SPLITS = ("train", "val")


def is_shards(path) -> bool:
    """Whether `path` is a folder of token shards (it holds index.json)."""
    return Path(path).is_dir() and (Path(path) / INDEX).is_file()


def shard_dtype(id_bound: int) -> np.dtype:
    """uint16 when every id is below 65,536, else uint32; little-endian whatever the machine."""
    return np.dtype("<u2") if id_bound <= 1 << 16 else np.dtype("<u4")


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def read_index(folder: Path) -> dict:
    """FOLDER/index.json, checked to be a finished index of this format."""
    path = Path(folder) / INDEX
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} cannot be read ({e}); prepare the shards again") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DataError(f"{path} is not an index of token shards (format {FORMAT}); give a "
                        "folder made by `monotile prepare text`")
    if index.get("version") != VERSION:
        raise DataError(f"{path} is version {index.get('version')} of the shard format, this "
                        f"monotile reads version {VERSION}; prepare the shards again")
    if not index.get("complete"):
        raise DataError(f"the shards in {folder} are not finished (their prepare was stopped); "
                        "run the same `monotile prepare` command again to finish them")
    return index


def verify(folder: Path, index: dict | None = None) -> int:
    """Check every shard and document-start file against its SHA-256 in index.json; DataError
    naming the first that differs. Returns the number of shards checked."""
    folder = Path(folder)
    index = index or read_index(folder)
    count = 0
    for split in SPLITS:
        for shard in index["splits"][split]["shards"]:
            for name, digest in ((shard["file"], shard["sha256"]),
                                 (shard["starts"], shard["starts_sha256"])):
                path = folder / name
                if not path.is_file() or file_sha256(path) != digest:
                    why = "is missing" if not path.is_file() else "differs from its SHA-256"
                    raise DataError(f"{path} {why} in {folder / INDEX}: the shard is damaged; "
                                    "prepare the shards again into a new folder")
            count += 1
    return count


class TokenShards:
    """A folder of shards, memory-mapped: random training windows and the validation ids,
    read where they are needed. A batch maps the shards it reads and drops the maps after
    it (nanoGPT's get_batch does so too): the pages a map touched count in the process's
    resident memory for as long as it lives, which would grow with every window drawn."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index = index = read_index(self.folder)
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size, self.eot = index["vocab_size"], index.get("eot_id")
        self.tokenizer_path = self.folder / index["tokenizer"]
        self.sizes = {split: [s["tokens"] for s in index["splits"][split]["shards"]]
                      for split in SPLITS}
        for split in SPLITS:  # a truncated file is seen at once; a changed byte by `verify`
            for shard in index["splits"][split]["shards"]:
                path = self.folder / shard["file"]
                st, want = path.stat() if path.is_file() else None, shard["tokens"] * \
                    self.dtype.itemsize
                if st is None or st.st_size != want:
                    have = f"has {st.st_size} bytes" if st else "is missing"
                    raise DataError(f"{path} {have}, {folder / INDEX} says {want}: the shard "
                                    "is damaged; prepare the shards again into a new folder")

    def tokens(self, split: str) -> int:
        return sum(self.sizes[split])

    def shard(self, split: str, k: int) -> np.memmap:
        """Shard k of a split, mapped read-only (a new map: drop it when done)."""
        name = self.index["splits"][split]["shards"][k]["file"]
        return np.memmap(self.folder / name, dtype=self.dtype, mode="r",
                         shape=(self.sizes[split][k],))

    def check(self, context: int) -> None:
        """Refuse shards that cannot give a training window or a validation window."""
        for split in SPLITS:
            if max(self.sizes[split], default=0) < context + 1:
                fix = ("prepare them with a larger --val-fraction" if split == "val" else
                       "give more text")
                raise DataError(f"the {split} shards of {self.folder} have no run of context + "
                                f"1 = {context + 1} tokens ({self.tokens(split)} in all); {fix}, "
                                "or use a smaller context")

    def windows(self, split: str, rng: torch.Generator, batch_size: int, T: int,
                rows: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Random windows (x, y) of T ids, `batch_size` starts drawn from `rng` each time;
        with `rows`, only those rows of the batch are read (every process draws alike)."""
        ends = np.cumsum([max(0, n - T) for n in self.sizes[split]])  # starts before shard k+1
        while True:
            starts = torch.randint(int(ends[-1]), (batch_size,), generator=rng)
            if rows is not None:
                starts = starts[rows]
            window, maps = np.empty((len(starts), T + 1), dtype=np.int64), {}
            for r, i in enumerate(starts.tolist()):
                k = int(np.searchsorted(ends, i, side="right"))
                o = i - (int(ends[k - 1]) if k else 0)
                if k not in maps:
                    maps[k] = self.shard(split, k)
                window[r] = maps[k][o:o + T + 1]
            del maps  # unmapped: what they read leaves resident memory
            window = torch.from_numpy(window)
            yield window[:, :-1], window[:, 1:]

    def segments(self, split: str, max_tokens: int | None = None) -> list[np.memmap]:
        """The split's shards in order, cut so that at most `max_tokens` ids are predicted
        (each shard is read on its own: one id less is predicted per shard)."""
        out, left = [], max_tokens
        for k, n in enumerate(self.sizes[split]):
            if left is not None and left <= 0:
                break
            keep = n if left is None else min(n, left + 1)
            out.append(self.shard(split, k)[:keep])
            if left is not None:
                left -= keep - 1
        return out

    def read(self, split: str) -> torch.Tensor:
        """A whole split as one tensor of ids (small corpora and tests; training never does)."""
        parts = [np.asarray(self.shard(split, k), dtype=np.int64)
                 for k in range(len(self.sizes[split]))]
        return torch.from_numpy(np.concatenate(parts))
