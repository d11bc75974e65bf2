"""Where data sets are found, and how a missing one is fetched.

A data set is named by its path under a data root (e.g. "tinyshakespeare/input.txt"). It is
looked up in this order: an explicit path (--data), $MONOTILE_DATA, ../shared/data beside the
checkout, the user cache ~/.cache/monotile. A missing data set with a canonical URL is
downloaded into the cache: streamed to a `.part` file behind a progress bar, resumed with an
HTTP Range request when a `.part` is there, its SHA-256 computed on the way and checked before
the rename. Upstream files in another layout (an archive, IDX files) are then made into the one
find_data expects, and that is checked too. Otherwise a one-line error says where to put it.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import shutil
import struct
import tarfile
import urllib.error
import urllib.request
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from .errors import DataError

CHECKOUT = Path(__file__).resolve().parents[1]
CHUNK = 1 << 16


def data_roots() -> list[Path]:
    roots = []
    if os.environ.get("MONOTILE_DATA"):
        roots.append(Path(os.environ["MONOTILE_DATA"]).expanduser())
    roots.append(CHECKOUT.parent / "shared" / "data")
    roots.append(cache_dir())
    return roots


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "monotile"


def _hash_into(h, path: Path):
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h


def sha256(path: Path) -> str:
    return _hash_into(hashlib.sha256(), path).hexdigest()


def folder_digest(folder: Path) -> str:
    """SHA-256 of a folder's listing: one `sha256  name` line per file, sorted by name (the
    format of sha256sum: `cd DIR && sha256sum $(ls | LC_ALL=C sort) | sha256sum` agrees)."""
    lines = "".join(f"{sha256(p)}  {p.name}\n" for p in sorted(folder.iterdir()))
    return hashlib.sha256(lines.encode()).hexdigest()


# ---- what upstream ships, and how it becomes the data set ------------------------------------

@dataclass(frozen=True)
class Download:
    """One upstream file, saved at `to` under the cache and checked against `sha256` (None
    where no stable hash of the file can be known; what is made from it is checked instead)."""
    url: str
    sha256: str | None
    to: str


@dataclass(frozen=True)
class DataSet:
    """A data set's upstream files. Without `make` the last download is the data set; with it,
    make(files, target, digest) builds the data set at target and checks it against digest."""
    downloads: tuple[Download, ...]
    make: Callable[[list[Path], Path, str], None] | None = None
    digest: str | None = None


MNIST_KEYS = ("x_train", "y_train", "x_test", "y_test")


def arrays_digest(arrays: dict) -> str:
    """SHA-256 of named uint8 arrays: each one's name, shape and bytes, in order. The arrays,
    not the .npz's bytes, are checked: another zlib compresses the same arrays differently."""
    import numpy as np
    h = hashlib.sha256()
    for key, a in arrays.items():
        h.update(f"{key} {a.dtype} {a.shape}\n".encode())
        h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()


def _read_idx(path: Path):
    """An IDX file of unsigned bytes (gzipped, as LeCun ships MNIST) -> its uint8 array."""
    import numpy as np
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path} is not a readable .gz file ({e}); delete it and fetch "
                        "again") from None
    ndim = raw[3] if len(raw) > 4 else 0
    if raw[:3] != b"\0\0\x08" or len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path} is not an IDX file of bytes; delete it and fetch again")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def make_mnist_npz(files: list[Path], target: Path, digest: str) -> None:
    """MNIST's four IDX files (in a folder of their own) -> mnist.npz with x_train, y_train,
    x_test, y_test; the IDX files and their folder are deleted once the arrays match `digest`."""
    import numpy as np
    arrays = dict(zip(MNIST_KEYS, (_read_idx(f) for f in files)))
    got = arrays_digest(arrays)
    if got != digest:
        raise DataError(f"the MNIST arrays read from {files[0].parent} have SHA-256 {got}, "
                        f"expected {digest}; delete {files[0].parent} and fetch again")
    part = target.with_name(target.name + ".part")
    with zipfile.ZipFile(part, "w", zipfile.ZIP_DEFLATED) as zf:
        for key, a in arrays.items():  # fixed dates and modes: the same arrays, the same bytes
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type, info.external_attr = zipfile.ZIP_DEFLATED, 0o600 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, a, allow_pickle=False)
    os.replace(part, target)
    for f in files:
        f.unlink()
    files[0].parent.rmdir()


def make_fsdd_recordings(files: list[Path], target: Path, digest: str) -> None:
    """FSDD's GitHub archive -> its recordings/*.wav extracted flat into target, the folder's
    listing checked against `digest` (folder_digest); the archive is then deleted."""
    archive = files[0]
    part = target.with_name(target.name + ".part")
    shutil.rmtree(part, ignore_errors=True)
    part.mkdir(parents=True)
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                name = PurePosixPath(member.name)
                if member.isfile() and name.parent.name == "recordings" and name.suffix == ".wav":
                    with tar.extractfile(member) as src, open(part / name.name, "wb") as dst:
                        shutil.copyfileobj(src, dst, CHUNK)
    except (tarfile.TarError, EOFError, OSError) as e:
        shutil.rmtree(part, ignore_errors=True)
        archive.unlink(missing_ok=True)
        raise DataError(f"{archive} is not a readable .tar.gz ({e}); it was deleted: fetch "
                        "again") from None
    got = folder_digest(part)
    if got != digest:
        count = sum(1 for _ in part.iterdir())
        shutil.rmtree(part)
        archive.unlink()
        raise DataError(f"the {count} recordings extracted from {archive.name} do not match "
                        f"FSDD v1.0.10 (listing SHA-256 {got}, expected {digest}); the archive "
                        "was deleted: fetch again, or put the recordings at "
                        f"{target} yourself")
    os.replace(part, target)
    archive.unlink()


GITHUB = "https://raw.githubusercontent.com"
MNIST = "https://ossci-datasets.s3.amazonaws.com/mnist"  # PyTorch's mirror of LeCun's files

# name (as find_data is asked for it) -> where it comes from. Every hash of a single file is
# the SHA-256 of the copy in ../shared/data, which is byte for byte the file at the URL (checked
# against each repository's git blob): tinyshakespeare, ETTh1, M4's two files.
KNOWN: dict[str, DataSet] = {
    "tinyshakespeare/input.txt": DataSet((Download(
        f"{GITHUB}/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        "tinyshakespeare/input.txt"),)),
    # Built from nltk_data's inaugural and state_union corpora (../shared/data/README.md): no
    # upstream file is this file, so it has no download. Its SHA-256 in ../shared/data:
    # 6098bd65f8468986639c304b7e9c5c276cc6648b090d6abdb914ecf093c95558.
    "speeches/speeches_public_domain.txt": DataSet(()),
    # LeCun's four IDX files (SHA-256s as published for them, e.g. by torchvision's users and
    # tensorflow-datasets), made into mnist.npz; `digest` is arrays_digest of the arrays in
    # ../shared/data/mnist/mnist.npz, which make_mnist_npz writes again byte for byte.
    "mnist/mnist.npz": DataSet((
        Download(f"{MNIST}/train-images-idx3-ubyte.gz",
                 "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                 "mnist/idx/train-images-idx3-ubyte.gz"),
        Download(f"{MNIST}/train-labels-idx1-ubyte.gz",
                 "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                 "mnist/idx/train-labels-idx1-ubyte.gz"),
        Download(f"{MNIST}/t10k-images-idx3-ubyte.gz",
                 "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                 "mnist/idx/t10k-images-idx3-ubyte.gz"),
        Download(f"{MNIST}/t10k-labels-idx1-ubyte.gz",
                 "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                 "mnist/idx/t10k-labels-idx1-ubyte.gz")),
        make=make_mnist_npz,
        digest="796354bf1a5bdb3f752e23f487245288f2c35b1e0bc343e07448cffbb5f56624"),
    # GitHub makes its archives on the fly and does not promise the same bytes twice, so the
    # archive's hash is None; the 3000 extracted recordings are checked instead: `digest` is
    # folder_digest of ../shared/data/fsdd/recordings, the same files as tag v1.0.10's.
    "fsdd/recordings": DataSet(
        (Download("https://github.com/Jakobovski/free-spoken-digit-dataset/archive/refs/tags/"
                  "v1.0.10.tar.gz", None, "fsdd/free-spoken-digit-dataset-1.0.10.tar.gz"),),
        make=make_fsdd_recordings,
        digest="1801eae019c063377d98f831d3f93574f259475df7332bb0e3d1b080fb5e6959"),
    "ett/ETTh1.csv": DataSet((Download(
        f"{GITHUB}/zhouhaoyi/ETDataset/main/ETT-small/ETTh1.csv",
        "f18de3ad269cef59bb07b5438d79bb3042d3be49bdeecf01c1cd6d29695ee066",
        "ett/ETTh1.csv"),)),
    "m4/Weekly-train.csv": DataSet((  # the test file beside it too: it holds the last 13 values
        Download(f"{GITHUB}/Mcompetitions/M4-methods/master/Dataset/Test/Weekly-test.csv",
                 "3b2bc4be8e636e802260dcd843ca3c5da40536a1fbe1ecb3229a97dae4f44688",
                 "m4/Weekly-test.csv"),
        Download(f"{GITHUB}/Mcompetitions/M4-methods/master/Dataset/Train/Weekly-train.csv",
                 "d478d3f6ed673e6ed3c2cb0fbed5425f72eedd51318ebebeb0b5ecfcefc37714",
                 "m4/Weekly-train.csv"))),
}


# ---- finding and fetching ----------------------------------------------------------------

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
    found = find_local(name)
    if found is not None:
        return found
    shipped = unpack_shipped(name)
    return shipped if shipped is not None else download(name)


# data sets inside the package, so the quick start needs no network: name -> gzipped file
SHIPPED = {"tinyshakespeare/input.txt": "tinyshakespeare.txt.gz"}


def unpack_shipped(name: str) -> Path | None:
    """A data set the package ships (gzipped), written out into the cache once and checked
    against its SHA-256; None for the others."""
    if name not in SHIPPED:
        return None
    target = cache_dir() / name
    download_ = KNOWN[name].downloads[-1]
    if target.exists() and sha256(target) == download_.sha256:
        return target
    source = Path(__file__).parent / "assets" / SHIPPED[name]
    if not source.exists():  # an install without its package data: fetch it instead
        return None
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.{os.getpid()}.part")
    with gzip.open(source, "rb") as src, open(part, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    if sha256(part) != download_.sha256:
        part.unlink()
        raise DataError(f"{source} does not unpack to {name} (SHA-256 mismatch); the package "
                        "is damaged: reinstall monotile")
    os.replace(part, target)
    return target


def find_local(name: str) -> Path | None:
    """Data set `name` in the first data root that has it, without downloading."""
    return next(((r / name).resolve() for r in data_roots() if (r / name).exists()), None)


def short_names() -> dict[str, str]:
    """`monotile data --fetch` names: each data set's folder (mnist, fsdd, ...) -> its name."""
    return {name.split("/")[0]: name for name in KNOWN}


def _fix(name: str) -> str:
    where = " or ".join(str(r / name) for r in data_roots()[:-1])
    return (f"put it at {where}, set $MONOTILE_DATA to the folder that holds it, or pass "
            "--data PATH")


def download(name: str) -> Path:
    """Data set `name` fetched into the cache (at once if it is already there): each upstream
    file streamed and checked, then made into the data set's layout and checked again."""
    entry = KNOWN.get(name)
    if entry is None or not entry.downloads:
        raise DataError(f"data set {name!r} not found and it has no download source; "
                        + _fix(name))
    target = cache_dir() / name
    if target.exists() and (entry.make or all((cache_dir() / d.to).exists()
                                              for d in entry.downloads)):
        return target
    files = [fetch_url(d.url, cache_dir() / d.to, d.sha256, name) for d in entry.downloads]
    if entry.make is not None:
        entry.make(files, target, entry.digest)
    return target


def fetch_url(url: str, path: Path, digest: str | None, name: str) -> Path:
    """url streamed to path + ".part" and renamed to path once whole and its SHA-256 is
    `digest` (any, if None). A .part already there is resumed with a Range request (from zero
    if the server ignores it); a transfer that stops leaves the .part for the next call."""
    from tqdm.auto import tqdm
    if path.exists():
        if digest is None or sha256(path) == digest:
            return path
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    h, done, total = hashlib.sha256(), part.stat().st_size if part.exists() else 0, None
    request = urllib.request.Request(url, headers={"User-Agent": "monotile",
                                                   **({"Range": f"bytes={done}-"} if done else {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            if r.status == 206:
                if not r.headers.get("Content-Range", "").startswith(f"bytes {done}-"):
                    part.unlink()
                    raise DataError(f"{url} answered the resume of {path.name} with another "
                                    "range; the partial file was deleted: fetch again")
                _hash_into(h, part)
            else:  # the whole file: there was no .part, or the server ignores Range
                done = 0
            length = r.headers.get("Content-Length")
            total = done + int(length) if length else None
            with open(part, "ab" if done else "wb") as f, \
                    tqdm(total=total, initial=done, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=path.name, disable=None) as bar:  # None: on a terminal
                while chunk := r.read(CHUNK):
                    f.write(chunk)
                    h.update(chunk)
                    bar.update(len(chunk))
    except urllib.error.HTTPError as e:
        if e.code != 416 or not part.exists():
            raise DataError(f"download of {name!r} from {url} failed: HTTP {e.code} "
                            f"{e.reason}; {_fix(name)}") from None
        _hash_into(h, part)  # 416: nothing after the .part's bytes; check it as it is
    except (OSError, http.client.HTTPException) as e:
        raise _stopped(name, url, part, e) from None
    if total is not None and part.stat().st_size < total:
        raise _stopped(name, url, part, f"{total - part.stat().st_size} of {total} bytes "
                       "missing: the connection closed early")
    got = h.hexdigest()
    if digest is not None and got != digest:
        part.unlink()
        raise DataError(f"{path.name} downloaded from {url} has SHA-256 {got}, expected "
                        f"{digest}; the file was deleted: fetch again, or {_fix(name)}")
    os.replace(part, path)
    return path


def _stopped(name: str, url: str, part: Path, why) -> DataError:
    kept = part.stat().st_size if part.exists() else 0
    resume = (f"; the {kept} bytes received are kept in {part}: run the command again to "
              "resume" if kept else "")
    return DataError(f"download of {name!r} from {url} stopped ({why}){resume}; or "
                     f"{_fix(name)}")


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
    """A UTF-8 text file's contents; DataError if it is a folder, unreadable, empty or
    binary."""
    if Path(path).is_dir():
        raise DataError(f"data {path} is a folder; a text run reads one UTF-8 text file (join "
                        f"the files first, e.g. cat {path}/*.txt > all.txt)")
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"data file {path} cannot be read ({e.strerror}); check the path and "
                        "its permissions") from None
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
    for name, entry in KNOWN.items():
        found = next((r / name for r in data_roots() if (r / name).exists()), None)
        rows.append({"name": name, "path": str(found) if found else None,
                     "source": entry.downloads[-1].url if entry.downloads else
                     "see ../shared/data/README.md"})
    return rows


def fetch(which: str) -> list[tuple[str, Path | DataError]]:
    """`monotile data --fetch`: data set `which` (its name or folder, e.g. mnist), or all of
    them, found or downloaded into the cache: (name, its path or why it could not be had)."""
    names = short_names()
    if which == "all":
        chosen = list(KNOWN)
    elif which in KNOWN or which in names:
        chosen = [names.get(which, which)]
    else:
        raise DataError(f"unknown data set {which!r}; give one of {', '.join(names)} or all")
    rows: list[tuple[str, Path | DataError]] = []
    for name in chosen:  # one that fails does not stop the others
        try:
            rows.append((name, find_local(name) or download(name)))
        except DataError as e:
            rows.append((name, e))
    return rows
