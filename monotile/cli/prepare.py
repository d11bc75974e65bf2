"""The verb that tokenizes a corpus once: prepare (text into memory-mapped token shards)."""

from __future__ import annotations

import sys
import warnings

from .common import emit, finish


def prepare(sub) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus once into memory-mapped token shards "
                       "(train on them with --data SHARDS); a stopped prepare continues")
    p.add_argument("task", choices=["text"], help="the modality whose data to prepare")
    p.add_argument("--data", nargs="+", required=True, metavar="FILE_OR_FOLDER",
                   help=".txt (documents: paragraphs), .jsonl (a text field per record) and "
                   ".parquet (a text column) files, or folders holding them")
    p.add_argument("--tokenizer", required=True, metavar="RUN_OR_FILE",
                   help="a text run directory (its tokenizer.json) or a tokenizer.json file")
    p.add_argument("--out", required=True, metavar="SHARDS", help="the folder of shards to "
                   "write (run again with the same arguments to continue a stopped prepare)")
    p.add_argument("--column", default="text", help="the JSONL field or Parquet column holding "
                   "the text (default text)")
    p.add_argument("--val-fraction", type=float, default=0.0005, metavar="F",
                   help="the fraction of documents held out for validation, chosen by a seeded "
                   "hash of each (default 0.0005, nanoGPT's for OpenWebText)")
    p.add_argument("--seed", type=int, default=2357, help="the seed of that choice (default "
                   "2357, nanoGPT's)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="tokens per shard file (default 100,000,000)")
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="tokenizing processes (default: one per CPU core)")
    finish(p, _prepare, json="print the figures as one JSON object", quiet=True)


def _prepare(a) -> int:
    from ..modalities.text_prepare import prepare_shards
    try:
        f = prepare_shards(a.data, a.tokenizer, a.out, shard_tokens=a.shard_tokens,
                           val_fraction=a.val_fraction, seed=a.seed, column=a.column,
                           workers=a.workers, progress=not (a.quiet or a.json))
    except KeyboardInterrupt:
        print(f"interrupted; the finished shards are kept: run the same command to continue "
              f"{a.out}", file=sys.stderr)
        return 130
    if f["dropped_characters"]:
        warnings.warn(f"dropped {f['dropped_characters']:,} characters outside the character "
                      "vocabulary of the tokenizer", stacklevel=1)
    if not f["val_tokens"]:
        warnings.warn("no document was held out for validation, and training needs some; "
                      "prepare into another folder with a larger --val-fraction", stacklevel=1)
    if f["already"]:
        line = (f"{f['out']} is prepared already: {f['verified_shards']} shards match their "
                "checksums")
    else:
        line = (f"prepared {f['out']}: {f['train_tokens']:,} train tokens in "
                f"{f['train_shards']} shards, {f['val_tokens']:,} val tokens "
                f"({f['val_documents']:,} of {f['train_documents'] + f['val_documents']:,} "
                f"documents), {f['dtype']}, {f['text_bytes'] / 1e6:,.1f} MB of text at "
                f"{f['mb_per_s']} MB/s" + (" (continued)" if f["resumed"] else ""))
    emit(a, f, line + f"\ntrain with: monotile train text --data {f['out']} --preset NAME")
    return 0
