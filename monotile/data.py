"""Where data sets are found, and how a missing one is fetched.

A data set is named by its path under a data root (e.g. "tinyshakespeare/input.txt"). It is
looked up in this order: an explicit path (--data), $MONOTILE_DATA, ../shared/data beside the
checkout, the user cache ~/.cache/monotile. A missing data set with a canonical URL is
downloaded into the cache and checked against its SHA-256; otherwise a one-line error says
where to put it.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
import warnings
from pathlib import Path

from .errors import DataError

CHECKOUT = Path(__file__).resolve().parents[1]

# name -> (canonical URL or None, sha256)
KNOWN = {
    "tinyshakespeare/input.txt": (
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
    "speeches/speeches_public_domain.txt": (
        None, "6098bd65f8468986639c304b7e9c5c276cc6648b090d6abdb914ecf093c95558"),
    "fsdd/recordings": (None, None),  # a folder of 3000 .wav files; fsdd.SHA256SUMS lists them
    "ett/ETTh1.csv": (
        "https://raw.githubusercontent.com/zhouhaoyi/ETDataset/main/ETT-small/ETTh1.csv",
        "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066"),
    "m4/Weekly-train.csv": (None, None),  # and m4/Weekly-test.csv beside it (M4-methods)
    "mnist/mnist.npz": (
        None, "06af5dfe73b70e3bc1c36439982b18a8d76803db9b544f6fdf838a37fbb01b64"),
}


def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("MONOTILE_DATA"):
        roots.append(Path(os.environ["MONOTILE_DATA"]).expanduser())
    roots.append(CHECKOUT.parent / "shared" / "data")
    roots.append(cache_dir())
    return roots


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "monotile"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def find_data(name: str, explicit: str | Path | None = None) -> Path:
    """The file for data set `name`, or the explicit path the user gave."""
    if explicit is not None:
        path = Path(explicit).expanduser()
        if not path.exists():
            raise DataError(f"data file {path} does not exist; check the --data path")
        return path.resolve()
    if Path(name).is_absolute():
        if not Path(name).exists():
            raise DataError(f"data file {name} does not exist; check the --data path")
        return Path(name)
    for root in data_roots():
        if (root / name).exists():
            return (root / name).resolve()
    return _download(name)


def _download(name: str) -> Path:
    url, digest = KNOWN.get(name, (None, None))
    where = " or ".join(str(r / name) for r in data_roots()[:-1]) or str(cache_dir() / name)
    if url is None:
        raise DataError(f"data set {name!r} not found; put it at {where}, set $MONOTILE_DATA "
                        "to the folder that holds it, or pass --data PATH")
    target = cache_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(target.suffix + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as f:
            f.write(r.read())
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"data set {name!r} not found and the download from {url} failed ({e}); "
                        f"put the file at {where} or pass --data PATH") from None
    if digest and sha256(tmp) != digest:
        tmp.unlink(missing_ok=True)
        raise DataError(f"download of {name!r} from {url} has the wrong SHA-256; "
                        f"put a good copy at {where}")
    os.replace(tmp, target)
    return target


def expand_inputs(inputs: list, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    """Files given on a command line: each file as is, each folder searched recursively for
    files with these suffixes; DataError for a missing path or a folder without such files."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in suffixes)
            if not found:
                raise DataError(f"{path} has no {kind} files ({', '.join(suffixes)})")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise DataError(f"{path} does not exist; give {kind} files or folders")
    return files


def listed_file(listing: Path, cell: str, what: str) -> Path:
    """A file named in a listing (a CSV or manifest of files): absolute, or relative to the
    listing's folder; DataError when it does not exist."""
    path = Path(cell.strip())
    path = path if path.is_absolute() else Path(listing).parent / path
    if not path.exists():
        raise DataError(f"{listing}: {what} {path} does not exist; fix the path (relative paths "
                        "are read from the listing's folder)")
    return path


def read_each(items: list, read, what: str, unit: str = "file") -> tuple[list, list]:
    """read(item) for each item: (the values, the items they came from). An item whose read
    raises DataError is skipped, with one warning naming the first; none readable is a
    DataError. A progress bar for long lists, on a terminal."""
    from tqdm.auto import tqdm
    values, kept, skipped = [], [], []
    for item in tqdm(items, desc=f"reading {what}", unit=unit,
                     disable=True if len(items) < 2000 else None):  # None: on a terminal
        try:
            values.append(read(item))
            kept.append(item)
        except DataError as e:
            skipped.append(str(e))
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(items)} {what} files could not be read and were "
                      f"skipped; the first: {skipped[0]}", stacklevel=3)
    if not values:
        raise DataError(f"none of the {what} files is readable; the first: {skipped[0]}")
    return values, kept


def nothing_readable(skipped: list[dict], kind: str) -> DataError:
    """The error when every input was skipped: the one input's own error, or a count."""
    return DataError(skipped[0]["error"] if len(skipped) == 1 else
                     f"none of the {len(skipped)} inputs could be read as {kind}; the first: "
                     f"{skipped[0]['error']}")


def read_text(path: Path) -> str:
    """A UTF-8 text file's contents; DataError if it is empty or binary."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise DataError(f"data file {path} is empty; give a file with text in it")
    if b"\x00" in raw[:1 << 16]:
        raise DataError(f"data file {path} looks binary (it contains NUL bytes); give a plain "
                        "UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 text (bad byte at offset {e.start}); "
                        "convert it to UTF-8 first") from None


def status() -> list[dict]:
    """Which known data sets are present and where: for `monotile data`."""
    rows = []
    for name, (url, _) in KNOWN.items():
        found = next((r / name for r in data_roots() if (r / name).exists()), None)
        rows.append({"name": name, "path": str(found) if found else None,
                     "source": url or "see ../shared/data/README.md"})
    return rows
