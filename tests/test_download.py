"""Data sets are downloaded as the registry says: streamed into the cache, resumed, checked.

Every download here comes from an HTTP server on 127.0.0.1 serving files from memory, with
Range support written below; the registry's URLs are pointed at it, the code under test is the
real one. The real data sets' own checks (hashes, MNIST's arrays, FSDD's listing) are tested on
the copies in ../shared/data, served as upstream ships them."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import http.server
import io
import socket
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from monotile import data
from monotile.data import DataSet, Download, download
from monotile.errors import DataError

SHARED = data.CHECKOUT.parent / "shared" / "data"
BODY = bytes(range(256)) * 1200  # 307,200 bytes: several chunks
BODY_SHA = hashlib.sha256(BODY).hexdigest()


class Handler(http.server.BaseHTTPRequestHandler):
    """GET of server.files[path], from the Range's first byte if asked (unless
    server.ignore_range); server.cut[path] ends the body at that byte, once, by closing the
    connection mid-file."""

    def do_GET(self):
        srv = self.server
        body = srv.files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        asked = self.headers.get("Range")
        srv.ranges.append(asked)
        start = 0
        if asked and not srv.ignore_range:
            start = int(asked.removeprefix("bytes=").split("-")[0])
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        cut = srv.cut.pop(self.path, None)
        self.wfile.write(body[start:cut])
        if cut is not None:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass  # the connection this handler cut

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.files, srv.cut, srv.ranges, srv.ignore_range = {}, {}, [], False
    srv.url = f"http://127.0.0.1:{srv.server_address[1]}"
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("MONOTILE_DATA", raising=False)
    return tmp_path / "monotile"


@pytest.fixture
def demo(server, cache, monkeypatch):
    """A registry entry demo/file.bin for BODY on the local server."""
    server.files["/file.bin"] = BODY
    monkeypatch.setitem(data.KNOWN, "demo/file.bin", DataSet((
        Download(f"{server.url}/file.bin", BODY_SHA, "demo/file.bin"),)))
    return cache / "demo" / "file.bin"


def point_at(server, monkeypatch, name: str, files: dict[str, bytes], keep_sha=True):
    """KNOWN[name]'s downloads fetched from the local server, which serves `files` (upstream
    file name -> bytes); their hashes kept, or set to the served bytes' (keep_sha=False)."""
    downloads = []
    for d in data.KNOWN[name].downloads:
        upstream = d.url.rsplit("/", 1)[1]
        server.files[f"/{upstream}"] = files[upstream]
        sha = d.sha256 if keep_sha else hashlib.sha256(files[upstream]).hexdigest()
        downloads.append(dataclasses.replace(d, url=f"{server.url}/{upstream}", sha256=sha))
    monkeypatch.setitem(data.KNOWN, name,
                        dataclasses.replace(data.KNOWN[name], downloads=tuple(downloads)))


def test_a_download_is_streamed_into_the_cache_and_found_there(demo):
    assert data.find_data("demo/file.bin") == demo.resolve()
    assert demo.read_bytes() == BODY
    assert not demo.with_name("file.bin.part").exists()
    assert download("demo/file.bin") == demo  # already there: not fetched again


def test_a_checksum_mismatch_deletes_the_file_and_names_both_hashes(demo, server, monkeypatch):
    monkeypatch.setitem(data.KNOWN, "demo/file.bin", DataSet((
        Download(f"{server.url}/file.bin", "0" * 64, "demo/file.bin"),)))
    with pytest.raises(DataError) as e:
        download("demo/file.bin")
    message = str(e.value)
    assert "\n" not in message
    assert "file.bin" in message and "0" * 64 in message and BODY_SHA in message
    assert "fetch again" in message
    assert list(demo.parent.iterdir()) == []


def test_an_interrupted_transfer_keeps_the_part_and_the_next_fetch_resumes_it(demo, server):
    server.cut["/file.bin"] = 100_000
    with pytest.raises(DataError, match="run the command again to resume"):
        download("demo/file.bin")
    part = demo.with_name("file.bin.part")
    assert part.stat().st_size == 100_000 and not demo.exists()
    assert download("demo/file.bin") == demo
    assert server.ranges == [None, "bytes=100000-"]
    assert demo.read_bytes() == BODY and not part.exists()


def test_a_server_that_ignores_range_is_downloaded_again_from_zero(demo, server):
    demo.parent.mkdir(parents=True)
    demo.with_name("file.bin.part").write_bytes(b"stale bytes of another try")
    server.ignore_range = True
    download("demo/file.bin")
    assert server.ranges == ["bytes=26-"]
    assert demo.read_bytes() == BODY


def test_a_part_that_is_already_whole_is_checked_not_fetched_again(demo, server):
    demo.parent.mkdir(parents=True)
    demo.with_name("file.bin.part").write_bytes(BODY)
    download("demo/file.bin")  # the server answers 416: nothing after the last byte
    assert server.ranges == [f"bytes={len(BODY)}-"]
    assert demo.read_bytes() == BODY


def test_a_missing_file_upstream_is_one_line_that_says_where_to_put_it(demo, server,
                                                                        monkeypatch):
    monkeypatch.setitem(data.KNOWN, "demo/file.bin", DataSet((
        Download(f"{server.url}/gone.bin", BODY_SHA, "demo/file.bin"),)))
    with pytest.raises(DataError, match=r"HTTP 404 .*MONOTILE_DATA"):
        download("demo/file.bin")


needs_shared = pytest.mark.skipif(not SHARED.exists(), reason="needs ../shared/data")


@needs_shared
def test_ett_and_m4_are_fetched_from_their_urls_and_match_their_registered_hashes(
        server, cache, monkeypatch):
    point_at(server, monkeypatch, "ett/ETTh1.csv",
             {"ETTh1.csv": (SHARED / "ett/ETTh1.csv").read_bytes()})
    point_at(server, monkeypatch, "m4/Weekly-train.csv",
             {f: (SHARED / "m4" / f).read_bytes() for f in ("Weekly-train.csv",
                                                              "Weekly-test.csv")})
    assert download("ett/ETTh1.csv") == cache / "ett/ETTh1.csv"
    assert download("m4/Weekly-train.csv") == cache / "m4/Weekly-train.csv"
    assert sorted(p.name for p in (cache / "m4").iterdir()) == ["Weekly-test.csv",
                                                                 "Weekly-train.csv"]


def idx_gz(a: np.ndarray) -> bytes:
    """An array as LeCun ships MNIST: a gzipped IDX file of unsigned bytes."""
    header = b"\0\0\x08" + bytes([a.ndim]) + struct.pack(f">{a.ndim}I", *a.shape)
    return gzip.compress(header + a.tobytes(), compresslevel=1)


@needs_shared
def test_mnist_is_made_from_its_idx_files_into_the_npz_find_data_expects(server, cache,
                                                                         monkeypatch):
    real = np.load(SHARED / "mnist/mnist.npz")
    upstream = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    files = {f: idx_gz(real[k]) for f, k in zip(upstream, data.MNIST_KEYS)}
    # gzip's bytes differ from LeCun's, so the served files' hashes; the arrays' digest is real
    point_at(server, monkeypatch, "mnist/mnist.npz", files, keep_sha=False)
    path = download("mnist/mnist.npz")
    assert path == cache / "mnist/mnist.npz"
    made = np.load(path)
    assert made.files == list(data.MNIST_KEYS)
    for key in data.MNIST_KEYS:
        np.testing.assert_array_equal(made[key], real[key])
    assert list((cache / "mnist").iterdir()) == [path]  # the IDX files are gone


def fsdd_archive(wavs: list[Path]) -> bytes:
    """A .tar.gz laid out as GitHub's archive of the FSDD tag."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        readme = tarfile.TarInfo("free-spoken-digit-dataset-1.0.10/README.md")
        readme.size = 5
        tar.addfile(readme, io.BytesIO(b"FSDD\n"))
        for wav in wavs:
            tar.add(wav, f"free-spoken-digit-dataset-1.0.10/recordings/{wav.name}")
    return buf.getvalue()


@needs_shared
def test_fsdd_is_extracted_from_its_github_archive_and_its_listing_checked(server, cache,
                                                                           monkeypatch):
    wavs = sorted((SHARED / "fsdd/recordings").iterdir())
    point_at(server, monkeypatch, "fsdd/recordings", {"v1.0.10.tar.gz": fsdd_archive(wavs)})
    path = download("fsdd/recordings")
    assert path == cache / "fsdd/recordings"
    assert sorted(p.name for p in path.iterdir()) == [w.name for w in wavs]
    assert list((cache / "fsdd").iterdir()) == [path]  # the archive is gone


@needs_shared
def test_an_fsdd_archive_missing_recordings_is_refused(server, cache, monkeypatch):
    wavs = sorted((SHARED / "fsdd/recordings").iterdir())[:3]
    point_at(server, monkeypatch, "fsdd/recordings", {"v1.0.10.tar.gz": fsdd_archive(wavs)})
    with pytest.raises(DataError, match="the 3 recordings extracted .* do not match"):
        download("fsdd/recordings")
    assert list((cache / "fsdd").iterdir()) == []


def test_monotile_data_fetch_of_an_unknown_name_exits_2(capsys):
    from monotile.cli import main
    assert main(["data", "--fetch", "nope"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'nope'" in err
    assert all(name in err for name in ("tinyshakespeare", "mnist", "fsdd", "ett", "m4", "all"))


def test_the_demos_corpus_ships_in_the_package_for_a_machine_with_no_network(cache,
                                                                            monkeypatch):
    monkeypatch.setattr(data, "data_roots", lambda: [cache])  # no ../shared/data, no $MONOTILE_DATA

    def offline(*args, **kwargs):
        raise OSError("no network here")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    path = data.find_data("tinyshakespeare/input.txt")
    assert path == cache / "tinyshakespeare/input.txt"
    assert data.sha256(path) == data.KNOWN["tinyshakespeare/input.txt"].downloads[0].sha256
    assert path.read_text().startswith("First Citizen:")
    path.write_text("damaged")  # a damaged copy in the cache is written again
    assert data.unpack_shipped("tinyshakespeare/input.txt").read_text().startswith("First")
    with pytest.raises(DataError, match="download of 'ett/ETTh1.csv'.*no network here"):
        data.find_data("ett/ETTh1.csv")  # the others still come from their URLs
