"""Hostile inputs: files that declare more than they hold, values a model cannot use, headers
that would lose data. Each is refused with one line (DataError; `error:` and exit 2 from the
CLI; a 4xx from the server) before anything large is decoded, or read without losing a value.

The runs are the smallest that train (a few seconds in all); every input is a real file
written here, some of them sparse (a header declaring hours of audio over a hole)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import soundfile as sf
import torch

import monotile
from monotile.errors import DataError
from monotile.modalities.audio import read_audio

from conftest import cli

SMALL = {"n_layer": "1", "n_head": "2", "d_model": "16", "d_ff": "32", "max_steps": "2",
         "eval_interval": "2", "log_interval": "1", "warmup_steps": "1", "seed": "0"}
LOOKBACK = 32


def history_lines(n: int = 40, c: str = "5") -> list[str]:
    """date,a,c: hourly rows, a a sine, c the constant the run trained on (or `c`)."""
    return ["date,a,c"] + [f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00,{np.sin(i / 5):.4f},{c}"
                           for i in range(n)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A forecaster (series a, and c: constant in training, so its scale is the 1e-8 floor),
    a CTC recogniser (four tones) and an image classifier (scikit-learn's digits)."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "s.csv").write_text("\n".join(history_lines(200)) + "\n")
    series = monotile.train("series", None, out=root / "series", data=root / "s.csv",
                            quiet=True, overrides=dict(SMALL, batch_size="16",
                                                       lookback=str(LOOKBACK), horizon="8",
                                                       patch_len="8", stride="8"))
    lines = []
    for i in range(4):
        tone = 0.3 * np.sin(2 * np.pi * (300 + 100 * i) * np.arange(8000) / 8000)
        sf.write(root / f"u{i}.wav", tone.astype(np.float32), 8000)
        lines.append(f"u{i}.wav,{['one', 'two'][i % 2]}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    speech = monotile.train("speech", None, out=root / "speech", data=root / "m.csv",
                            quiet=True, overrides=dict(SMALL, batch_size="2", ema="0",
                                                       sample_rate="8000", n_fft="200",
                                                       hop="80", n_mels="20"))
    vision = monotile.train("vision", "digits", out=root / "vision", quiet=True,
                            overrides=dict(SMALL, batch_size="8", ema="0"))
    return {"series": series, "speech": speech, "vision": vision}


# ---- files that lie about their size ---------------------------------------------------------

def wav(path, rate: int, channels: int = 1, frames: int = 2, bits: int = 16):
    """A PCM WAV header declaring rate, channels and frames; the samples zero. Past a few
    kilobytes the file is sparse (a hole, no disk), so hours cost nothing to write."""
    block = channels * bits // 8
    size = frames * block
    head = (b"RIFF" + struct.pack("<I", 36 + size) + b"WAVE" + b"fmt " +
            struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * block) & 0xFFFFFFFF, block,
                        bits) + b"data" + struct.pack("<I", size))
    with open(path, "wb") as f:
        f.write(head + b"\0" * min(size, 4096))
        f.truncate(len(head) + size)
    return path


def float_wav(path, value: float):
    """One second at 8 kHz of a float WAV, quiet tone, with `value` among its samples."""
    x = (0.1 * np.sin(np.arange(8000) / 3)).astype(np.float32)
    x[4000] = value
    sf.write(path, x, 8000, subtype="FLOAT")
    return path


def png(path, width: int, height: int):
    """A real 1-bit PNG of width x height black pixels: a few kilobytes that decode to
    width x height bytes."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I",
                                                                        zlib.crc32(kind + data))
    row = b"\0" * (1 + (width + 7) // 8)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" +
                     chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)) +
                     chunk(b"IDAT", zlib.compress(row * height)) + chunk(b"IEND", b""))
    return path


def text(name: str, body: str):
    def write(d):
        (d / name).write_text(body)
        return d / name
    return write


def lines(name: str, rows: list[str]):
    return text(name, "\n".join(rows) + "\n")


def with_value(value: str, column: int = 2, row: int = 35):
    """The history with one cell replaced (column 1 = a, 2 = c)."""
    rows = history_lines()
    cells = rows[row].split(",")
    cells[column] = value
    rows[row] = ",".join(cells)
    return rows


def big_csv(d):
    with open(d / "big.csv", "wb") as f:
        f.write(b"date,a,c\n")
        f.truncate(300 * 2 ** 20)  # 300 MiB, sparse
    return d / "big.csv"


def many_cells(d):
    row = "," * 4999 + "\n"  # 5000 empty cells
    (d / "cells.csv").write_text("a" + row * 5001)
    return d / "cells.csv"


WIDE = ["date," + ",".join(f"s{j}" for j in range(101))] + [
    f"2020-01-{1 + i // 24:02d} {i % 24:02d}:00," + ",".join(f"{(i * j) % 7}" for j in range(101))
    for i in range(LOOKBACK + 2)]

# (id, run, input: writer(tmp_path) or JSON, predict options, fragments of the one-line error,
#  also through the CLI)
REFUSED = [
    # 1. what a header declares is bounded before a sample or pixel is decoded
    ("wav rate 2 MHz", "speech", lambda d: wav(d / "fast.wav", 2_000_003), {},
     ["fast.wav", "2000003 Hz", "4000-384000 Hz"], True),
    ("wav rate 2^31-1", "speech", lambda d: wav(d / "max.wav", 2 ** 31 - 1), {},
     ["2147483647 Hz", "4000-384000 Hz"], False),
    ("wav rate 1 Hz", "speech", lambda d: wav(d / "slow.wav", 1), {}, ["1 Hz"], False),
    ("wav 65 channels", "speech", lambda d: wav(d / "ch.wav", 8000, channels=65, frames=10), {},
     ["65 channels", "1 to 64"], False),
    ("wav 4.5 hours", "speech", lambda d: wav(d / "long.wav", 4000, frames=4000 * 16200, bits=8),
     {}, ["16,200 s", "4 h"], False),
    ("wav 32 channels x 70 min", "speech",
     lambda d: wav(d / "wide.wav", 8000, channels=32, frames=8000 * 4200, bits=8), {},
     ["1,075,200,000 samples", "1,073,741,824"], False),
    ("png 9500 x 9500", "vision", lambda d: png(d / "big.png", 9500, 9500), {},
     ["big.png", "9500 x 9500 pixels", "89,478,485"], True),
    ("png 20000 x 20000", "vision", lambda d: png(d / "huge.png", 20000, 20000), {},
     ["400000000 pixels", "89,478,485"], False),
    ("csv 300 MiB", "series", big_csv, {}, ["300 MiB", "256 MiB"], False),
    ("csv 25 million cells", "series", many_cells, {}, ["more than 25,000,000 cells"], False),
    ("csv cell past the csv module's limit", "series",
     lines("wide.csv", ["date,a", "2020-01-01," + "1" * 200_000]), {},
     ["not a readable CSV", "field larger"], False),
    # 2. nothing to forecast
    ("csv separated by ;", "series", lines("semi.csv", ["a;b"] + [f"{i};{i}" for i in range(40)]),
     {}, ["semi.csv has no numeric column", "separate its columns with commas"], True),
    ("csv of dates only", "series",
     lines("dates.csv", ["date"] + [f"2020-01-{1 + i % 28:02d}" for i in range(40)]), {},
     ["dates.csv has no numeric column", "a column of numbers per series"], False),
    ("csv of words only", "series", lines("words.csv", ["name"] + ["spam"] * 40), {},
     ["no numeric column"], False),
    ("json csv of dates only", "series",
     {"csv": "day\n" + "".join(f"2020-01-{1 + i % 28:02d}\n" for i in range(40))}, {},
     ["no numeric column"], False),
    # 3. values that give a wrong result without a word
    ("history c = 1e14 (1e22 in model units)", "series", lines("e14.csv", with_value("1e14")),
     {}, ["forecast of series 'c' is not finite", "rescale"], True),
    ("history -inf", "series", lines("inf.csv", with_value("-inf", 1)), {},
     ["series 'a'", "not finite"], False),
    ("history 1e308", "series", lines("e308.csv", with_value("1e308", 1)), {},
     ["series 'a'", "not finite"], False),
    ("json series 1e14", "series",
     {"series": {"c": [5.0] * 30 + [1e14] * 10, "a": [0.5] * 40}}, {},
     ["forecast of series 'c' is not finite"], False),
    ("wav NaN sample", "speech", lambda d: float_wav(d / "nan.wav", float("nan")), {},
     ["nan.wav", "not finite"], True),
    ("wav inf sample", "speech", lambda d: float_wav(d / "inf.wav", float("inf")), {},
     ["not finite"], False),
    ("wav sample 1e30", "speech", lambda d: float_wav(d / "loud.wav", 1e30), {},
     ["beyond +-1,000,000"], False),
    ("csv duplicate column", "series",
     lines("dup.csv", [r.replace("date,a,c", "date,a,a") for r in history_lines()]), {},
     ["column 'a' appears twice", "columns 2 and 3"], True),
    ("json series with an empty name", "series",
     {"series": {"": [float(i % 5) for i in range(40)]}}, {}, ["empty name"], False),
    # 4. a horizon is bounded, and so is the forecast's size
    ("horizon 100000000", "series", lines("h.csv", history_lines()), {"horizon": 100_000_000},
     ["horizon 100000000 is invalid", "at most 10000"], True),
    ("101 series x horizon 10000", "series", lines("wide.csv", WIDE), {"horizon": 10_000},
     ["1,010,000 forecasts", "at most 9,900 steps"], False),
]


def _predict(run, source, options):
    """As the CLI reads a file (Run.predict), or as the server reads JSON (Task.read)."""
    if isinstance(source, dict):
        return run.task.predict(run.model, [run.task.read(source)], **options)
    return run.predict([source], **options)


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_hostile_input_is_refused_with_one_line(runs, tmp_path, case):
    _, kind, make, options, fragments, _ = case
    source = make(tmp_path) if callable(make) else make
    with pytest.raises(DataError) as e:
        _predict(runs[kind], source, options)
    message = str(e.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


CLI = [c for c in REFUSED if c[5]]


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_hostile_input_is_one_error_line_and_exit_2_in_the_cli(runs, tmp_path, case):
    _, kind, make, options, fragments, _ = case
    args = [f"--{k}={v}" for k, v in options.items()]
    out = cli("predict", str(runs[kind].dir), str(make(tmp_path)), *args, "--output",
              str(tmp_path / "out.csv"))
    assert out.returncode == 2, (out.stdout, out.stderr)
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in out.stderr, out.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    assert not (tmp_path / "out.csv").exists()


# ---- headers that lost data, and odd files that are fine ---------------------------------------

def test_an_empty_header_cell_names_its_column_as_pandas_does_and_loses_no_value(runs, tmp_path):
    import pandas as pd
    task = runs["series"].task
    values = [f"{np.sin(i / 5):.4f}" for i in range(40)]
    lone = tmp_path / "lone.csv"  # one column whose header cell is empty: the first line blank
    lone.write_text("\n" + "\n".join(values) + "\n")
    history = task.read(lone)
    assert list(history.values) == ["Unnamed: 0"]
    assert history.values["Unnamed: 0"].tolist() == [float(v) for v in values]
    middle = tmp_path / "middle.csv"
    rows = history_lines()
    middle.write_text("".join(r + ",\n" for r in [rows[0].replace(",a,", ",,")] + rows[1:]))
    history = task.read(middle)  # and a trailing comma: an empty column, dropped
    named = pd.read_csv(middle).dropna(axis=1, how="all")
    assert list(history.values) == [c for c in named.columns if c != "date"] == ["Unnamed: 1",
                                                                                "c"]
    assert history.values["Unnamed: 1"].tolist() == pytest.approx(
        named["Unnamed: 1"].tolist())
    result = runs["series"].predict([middle])
    assert {r["series"] for r in result["forecast"]} == {"Unnamed: 1", "c"}
    # a header line before the data's blank lines is still the header (as pandas skips them)
    spaced = tmp_path / "spaced.csv"
    spaced.write_text("\n\n" + "\n".join(history_lines()) + "\n")
    assert list(task.read(spaced).values) == ["a", "c"]


def test_a_row_wider_than_its_header_keeps_the_extra_column(runs, tmp_path):
    rows = history_lines()
    wide = tmp_path / "wide.csv"
    wide.write_text("\n".join([rows[0]] + [r + ",7" for r in rows[1:]]) + "\n")
    history = runs["series"].task.read(wide)
    assert list(history.values) == ["a", "c", "Unnamed: 3"]
    assert set(history.values["Unnamed: 3"].tolist()) == {7.0}


def test_an_odd_sample_rate_is_read_at_the_nearest_simple_ratio(runs, tmp_path):
    """383,999 Hz to 8 kHz does not reduce (a 7.7-million-tap filter, 650 MB for a 48-byte
    file); it is read as 384,000 Hz would be, within 5e-5 of the exact length."""
    rate = 383_999
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate // 2) / rate)).astype(np.float32)
    sf.write(tmp_path / "odd.wav", tone, rate)
    wave = runs["speech"].task.read(tmp_path / "odd.wav")
    assert abs(len(wave) - len(tone) * 8000 / rate) <= 1
    sf.write(tmp_path / "even.wav", tone, 384_000)
    assert torch.equal(wave, read_audio(tmp_path / "even.wav", 8000))
    assert runs["speech"].predict([tmp_path / "odd.wav"])["predictions"][0]["duration"] == 0.5


# ---- the same refusals through the server --------------------------------------------------------

def test_the_server_answers_hostile_inputs_with_4xx(runs, tmp_path):
    import time

    from starlette.testclient import TestClient

    from monotile.serve.app import create_app
    app = create_app([runs[k].dir for k in ("series", "speech", "vision")],
                     names=["series", "speech", "vision"])
    with TestClient(app) as client:
        deadline = time.monotonic() + 120
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        fast = wav(tmp_path / "fast.wav", 2_000_003).read_bytes()
        r = client.post("/v1/audio/transcriptions", data={"model": "speech"},
                        files={"file": ("fast.wav", fast, "audio/wav")})
        assert 400 <= r.status_code < 500 and "2000003 Hz" in r.text, r.text
        r = client.post("/v1/images/classifications", data={"model": "vision"},
                        files={"file": ("big.png", png(tmp_path / "b.png", 9500, 9500)
                                        .read_bytes(), "image/png")})
        assert 400 <= r.status_code < 500 and "9500 x 9500" in r.text, r.text
        for body, fragment in [({"csv": "a;b\n" + "1;2\n" * 40}, "no numeric column"),
                               ({"csv": "\n".join(with_value("1e14"))}, "not finite"),
                               ({"series": {"": [1.0] * 40}}, "empty name")]:
            r = client.post("/v1/forecasts", json={"model": "series", **body})
            assert r.status_code == 400 and fragment in r.text, (body, r.text)
