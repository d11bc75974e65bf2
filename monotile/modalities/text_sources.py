"""The documents of a corpus's files, read in pieces that workers tokenize (text_prepare.py).

Documents: a .txt file's paragraphs (text up to and including a blank line; one longer than
4 MiB is cut at a line end), each record's "text" of a .jsonl file (its other fields are left
alone; a chat or instruction record is refused), each row's "text" of a Parquet file (--column
chooses another field or column; null and empty texts are skipped). A document's position is
its byte offset (a Parquet row's number), which with the file's name decides its split.

A .txt or .jsonl file is read in pieces [p, p + e): BLOCK bytes read from p (twice that, and
so on, when no piece can end within) and cut at e, the last paragraph (record) end in them.
The pieces are the same from any of their starts, which lets a stopped prepare read on.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

SUFFIXES = (".txt", ".jsonl", ".parquet")
BLOCK = 4 << 20                    # bytes of a .txt or .jsonl file read as one piece of work
PARAGRAPH_END = re.compile(rb"\n(?:\r?\n)+")  # a line end and the blank lines after it


@dataclass(frozen=True)
class Source:
    path: Path
    name: str   # its path under the folder given (the file's name when given alone)
    kind: str   # txt | jsonl | parquet


@dataclass(frozen=True)
class Piece:
    """One piece of work: a block of a .txt or .jsonl file, or a row group of a Parquet file."""
    source: int
    start: int          # byte offset (row group for Parquet)
    end: int
    first: int          # the line (row) number of its first record
    next_first: int
    data: bytes | None  # the block (None for Parquet: the worker reads its row group)
    file_bytes: int     # of the file, for the progress bar
    last: bool          # the file's last piece


def find_sources(inputs: list) -> list[Source]:
    """The files to prepare: each file given, and every .txt, .jsonl and .parquet file under
    each folder given (sorted; hidden ones left out); DataError for a missing path, an unknown
    file type or none."""
    if not inputs:
        raise DataError("give the text to prepare: --data FILES_OR_FOLDERS")
    sources: list[Source] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower()
                           in SUFFIXES and not any(part.startswith(".") for part in
                                                   p.relative_to(path).parts))  # no .git/
            if not found:
                raise DataError(f"{path} has no {', '.join(SUFFIXES)} files; give a folder "
                                "of text files, or the files themselves")
            sources += [Source(p.resolve(), p.relative_to(path).as_posix(),
                               p.suffix.lower()[1:]) for p in found]
        elif path.is_file():
            if path.suffix.lower() not in SUFFIXES:
                raise DataError(f"{path} is a {path.suffix or 'suffix-less'} file; prepare "
                                f"reads {', '.join(SUFFIXES)} files")
            sources.append(Source(path.resolve(), path.name, path.suffix.lower()[1:]))
        else:
            raise DataError(f"{path} does not exist; check the --data path")
    return sources


# ---- reading: pieces of each file -----------------------------------------------------------

def _txt_cut(block: bytes, eof: bool) -> int | None:
    """Where a block ends: after its last paragraph, else its last line, else its last whole
    character (None: no character ends in it)."""
    if eof:
        return len(block)
    for start in (max(0, len(block) - (1 << 16)), 0):
        ends = [m.end() for m in PARAGRAPH_END.finditer(block, start) if m.end() < len(block)]
        if ends:
            return ends[-1]
    line = block.rfind(b"\n") + 1
    if line:
        return line
    p = len(block) - 1
    while p > 0 and block[p] & 0xC0 == 0x80:  # back to the first byte of a character
        p -= 1
    return p or None


def _jsonl_cut(block: bytes, eof: bool) -> int | None:
    return len(block) if eof else (block.rfind(b"\n") + 1 or None)


def _blocks(path: Path, start: int, first: int, cut, source: int):
    """Pieces [pos, pos + end) of a file, each read from pos as BLOCK bytes (twice that, and
    so on, when no piece ends within) and cut there: the same pieces from any of their
    starts, which is what lets a stopped prepare read on from one."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        pos = start
        while pos < size:
            want = BLOCK
            while True:
                f.seek(pos)
                block = f.read(want)
                end = cut(block, len(block) < want)
                if end is not None:
                    break
                want *= 2
            lines = block.count(b"\n", 0, end)
            yield Piece(source, pos, pos + end, first, first + lines, block[:end], end,
                        pos + end >= size)
            pos, first = pos + end, first + lines


def _row_groups(src: Source, start: int, first: int, column: str, source: int):
    """A Parquet file's pieces: its row groups from `start` (their rows, not read here)."""
    meta = parquet_file(src.path, column).metadata
    size, rows = src.path.stat().st_size, max(1, meta.num_rows)
    for g in range(start, meta.num_row_groups):
        n = meta.row_group(g).num_rows
        yield Piece(source, g, g + 1, first, first + n, None, size * n // rows,
                    g == meta.num_row_groups - 1)
        first += n


def parquet_file(path: Path, column: str | None = None):
    """A Parquet file opened with pyarrow (its footer only), its text `column` checked."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path} is a Parquet file, and reading it needs pyarrow: pip install "
                        "pyarrow (or monotile[parquet])") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own errors: not a Parquet file, damaged
        raise DataError(f"{path} is not a readable Parquet file ({e})") from None
    if column is not None:
        names = pf.schema_arrow.names
        if column not in names:
            raise DataError(f"{path} has no column {column!r} (its columns: "
                            f"{', '.join(names)}); choose one with --column")
        kind = str(pf.schema_arrow.field(column).type)
        if kind not in ("string", "large_string", "string_view"):
            raise DataError(f"column {column!r} of {path} holds {kind}, not text; choose a "
                            "text column with --column")
    return pf


def pieces(sources: list[Source], progress: list[dict], column: str):
    """The pieces of every file from where `progress` says it was read up to."""
    for i, (src, done) in enumerate(zip(sources, progress)):
        if done["done"]:
            continue
        if src.kind == "parquet":
            yield from _row_groups(src, done["read"], done["line"], column, i)
        else:
            cut = _txt_cut if src.kind == "txt" else _jsonl_cut
            yield from _blocks(src.path, done["read"], done["line"], cut, i)


def documents(piece: Piece, src: Source, column: str) -> list[tuple[int, str]]:
    """(position, text) of each document of a piece."""
    if src.kind == "parquet":
        col = parquet_file(src.path).read_row_group(piece.start, columns=[column]).column(0)
        return [(piece.first + i, t) for i, t in enumerate(col.to_pylist()) if t]
    block, docs = piece.data, []
    if src.kind == "txt":
        if piece.start == 0 and b"\x00" in block[:1 << 16]:
            raise DataError(f"{src.path} looks binary (it contains NUL bytes); give plain "
                            "UTF-8 text")
        bounds = [0, *(m.end() for m in PARAGRAPH_END.finditer(block) if m.end() < len(block)),
                  len(block)]
        for a, b in zip(bounds, bounds[1:]):
            try:
                docs.append((piece.start + a, block[a:b].decode("utf-8")))
            except UnicodeDecodeError as e:
                raise DataError(f"{src.path} is not UTF-8 text (bad byte at offset "
                                f"{piece.start + a + e.start}); convert it to UTF-8 first") \
                    from None
        return docs
    offset = 0
    for n, line in enumerate(block.split(b"\n"), start=piece.first + 1):
        at, offset = offset, offset + len(line) + 1
        if not line.strip():
            continue
        where = f"{src.path}, line {n}"
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where} is not JSON ({e}); each line must be one JSON object "
                            "with a text field") from None
        if not isinstance(record, dict) or column not in record:
            chat = isinstance(record, dict) and ({"messages", "prompt"} & set(record))
            fix = (": chat and instruction records train in memory (monotile train text "
                   f"--data {src.path.name}); prepare takes records of plain text"
                   if chat else f"; give records like {{\"{column}\": \"...\"}} or choose the "
                   "field with --column")
            raise DataError(f"{where} has no {column!r} field{fix}")
        text = record[column]
        if text is not None and not isinstance(text, str):
            raise DataError(f"{where}: {column!r} is {type(text).__name__}, not text")
        if text:
            docs.append((piece.start + at, text))
    return docs
