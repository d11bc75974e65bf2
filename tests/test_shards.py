"""Token shards on real text: `monotile prepare text` writes the tokenizer's own encoding of
each document, checksummed, and a stopped prepare continues to the very files of an
uninterrupted one; training reads them memory-mapped, resumes bit-exactly after kill -9, and
two processes train the model one process trains."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import monotile
from monotile.data import find_data
from monotile.errors import DataError
from monotile.modalities.text_prepare import held_out, prepare_shards
from monotile.modalities.text_shards import TokenShards, verify
from monotile.tokenizers import Tokenizer

from conftest import TINY, cli, kill_9_at_step, set_args

EOT = "<|endoftext|>"


# ---- real text, and the tokenizers that read it ---------------------------------------------

@pytest.fixture(scope="module")
def speeches() -> str:
    return find_data("speeches/speeches_public_domain.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return find_data("tinyshakespeare/input.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def bpe(tmp_path_factory, speeches) -> Path:
    """A byte-level BPE of 512 tokens learnt on the speeches, with an end-of-text token."""
    tok = Tokenizer.train_bpe(speeches[:300_000], 512)
    tok.tok.add_special_tokens([EOT])
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    tok.save(path)
    return path


@pytest.fixture(scope="module")
def chars(tmp_path_factory, shakespeare_text, speeches) -> Path:
    """Tiny Shakespeare's and the speeches' characters (no end-of-text token)."""
    path = tmp_path_factory.mktemp("char") / "tokenizer.json"
    Tokenizer.train_char(shakespeare_text + speeches).save(path)
    return path


def paragraphs(text: str) -> list[str]:
    """A .txt file's documents: the text cut after each run of two or more line ends."""
    return [p for p in re.split(r"(?<=\n\n)(?!\n)", text) if p]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, shakespeare_text, speeches) -> Path:
    """A folder of three kinds of file: 200 kB of Tiny Shakespeare as .txt, the speeches'
    first paragraphs as .jsonl records (with an id field beside the text), their next ones as
    the rows of a .parquet file (with a year column)."""
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a_shakespeare.txt").write_text(shakespeare_text[:200_000], encoding="utf-8")
    paras = paragraphs(speeches)
    with open(folder / "b_speeches.jsonl", "w", encoding="utf-8") as f:
        for i, p in enumerate(paras[:400]):
            f.write(json.dumps({"id": i, "text": p}) + "\n")
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    rows = paras[400:900]
    pq.write_table(pa.table({"year": list(range(len(rows))), "text": rows}),
                   folder / "c_speeches.parquet", row_group_size=128)
    return folder


def expected(corpus: Path, tok: Tokenizer, eot: int | None, seed: int, fraction: float):
    """Each split's ids and document lengths, from the files read here as the docs say: a
    document's ids are the tokenizer's encoding of it, then the end-of-text id."""
    docs = []  # (file name, position, text)
    text = (corpus / "a_shakespeare.txt").read_text(encoding="utf-8")
    at = 0
    for p in paragraphs(text):
        docs.append(("a_shakespeare.txt", at, p))
        at += len(p.encode("utf-8"))
    at = 0
    for line in (corpus / "b_speeches.jsonl").read_bytes().splitlines(keepends=True):
        docs.append(("b_speeches.jsonl", at, json.loads(line)["text"]))
        at += len(line)
    import pyarrow.parquet as pq
    for row, p in enumerate(pq.read_table(corpus / "c_speeches.parquet")["text"].to_pylist()):
        docs.append(("c_speeches.parquet", row, p))
    out = {"train": ([], []), "val": ([], [])}
    for name, position, doc in docs:
        ids = tok.encode(doc) + ([eot] if eot is not None else [])
        split = "val" if held_out(seed, name, position, fraction) else "train"
        out[split][0].extend(ids)
        out[split][1].append(len(ids))
    return out


def read_split(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's ids and the positions where its documents start, over all its shards."""
    index = json.loads((folder / "index.json").read_text())
    ids, starts, offset = [], [], 0
    for shard in index["splits"][split]["shards"]:
        ids.append(np.fromfile(folder / shard["file"], dtype=index["dtype"]))
        starts.append(np.load(folder / shard["starts"]) + offset)
        offset += shard["tokens"]
    return np.concatenate(ids), np.concatenate(starts)


# ---- prepare ------------------------------------------------------------------------------

def test_shards_hold_the_tokenizers_own_encoding_of_each_txt_jsonl_and_parquet_document(
        corpus, bpe, tmp_path):
    out = tmp_path / "shards"
    f = prepare_shards([corpus], bpe, out, shard_tokens=20_000, val_fraction=0.05, workers=2)
    tok = Tokenizer.load(bpe)
    eot = tok.tok.token_to_id(EOT)
    want = expected(corpus, tok, eot, seed=2357, fraction=0.05)
    index = json.loads((out / "index.json").read_text())
    assert index["complete"] and index["dtype"] == "uint16" and index["eot_id"] == eot
    assert (out / "tokenizer.json").read_bytes() == bpe.read_bytes()
    assert [s["name"] for s in index["settings"]["sources"]] == [
        "a_shakespeare.txt", "b_speeches.jsonl", "c_speeches.parquet"]
    for split in ("train", "val"):
        ids, starts = read_split(out, split)
        assert ids.tolist() == want[split][0], split
        lengths = want[split][1]
        assert starts.tolist() == np.concatenate(([0], np.cumsum(lengths)[:-1])).tolist()
        assert index["splits"][split]["documents"] == len(lengths)
        assert (ids == eot).sum() == len(lengths)  # one end-of-text id after each document
    shards = index["splits"]["train"]["shards"]
    assert len(shards) > 3 and all(s["tokens"] == 20_000 for s in shards[:-1])
    n_val, n_all = f["val_documents"], f["train_documents"] + f["val_documents"]
    assert 0.02 < n_val / n_all < 0.08  # 5 % of the documents, by a seeded hash of each
    assert verify(out) == len(shards) + len(index["splits"]["val"]["shards"])


def test_the_same_shards_whatever_the_workers_and_another_seed_holds_out_others(
        corpus, bpe, tmp_path):
    one = prepare_shards([corpus], bpe, tmp_path / "one", shard_tokens=30_000,
                         val_fraction=0.05, workers=1)
    two = prepare_shards([corpus], bpe, tmp_path / "two", shard_tokens=30_000,
                         val_fraction=0.05, workers=2)
    assert files(tmp_path / "one") == files(tmp_path / "two")
    assert one["val_tokens"] == two["val_tokens"]
    other = prepare_shards([corpus], bpe, tmp_path / "seed", shard_tokens=30_000,
                           val_fraction=0.05, seed=1, workers=1)
    assert read_split(tmp_path / "seed", "val")[0].tolist() != \
        read_split(tmp_path / "one", "val")[0].tolist()
    assert other["train_tokens"] + other["val_tokens"] == one["train_tokens"] + one["val_tokens"]


def test_a_small_vocabulary_is_uint16_and_one_past_65536_is_uint32(tmp_path, shakespeare_text):
    text = tmp_path / "text.txt"
    text.write_text(shakespeare_text[:5000], encoding="utf-8")
    small = tmp_path / "small.json"
    Tokenizer.train_char(shakespeare_text).save(small)
    prepare_shards([text], small, tmp_path / "u16", val_fraction=0.1, workers=1)
    assert json.loads((tmp_path / "u16" / "index.json").read_text())["dtype"] == "uint16"

    many = "".join(chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c < 0xE000)
    big = tmp_path / "big.json"
    tok = Tokenizer.train_char(shakespeare_text + many)
    tok.save(big)
    assert tok.vocab_size > 1 << 16
    rare = "".join(chr(c) for c in range(0x11000, 0x11100))  # ids above 65,535
    text.write_text(shakespeare_text[:5000] + rare + "\n", encoding="utf-8")
    f = prepare_shards([text], big, tmp_path / "u32", val_fraction=0.0, workers=1)
    ids, _ = read_split(tmp_path / "u32", "train")
    assert f["dtype"] == "uint32" and ids.dtype == np.dtype("<u4")
    assert ids.tolist() == tok.encode(shakespeare_text[:5000] + rare + "\n")
    assert ids.max() > 1 << 16


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())
            if not p.name.startswith(".")}


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_a_stopped_prepare_continues_to_the_files_of_an_uninterrupted_one(
        how, tmp_path, speeches, chars):
    big = tmp_path / "corpus" / "speeches_x2.txt"
    big.parent.mkdir()
    big.write_text(speeches * 2, encoding="utf-8")  # 5.8 MB: 11 shards of 500,000
    args = ["prepare", "text", "--data", str(big.parent), "--tokenizer", str(chars),
            "--shard-tokens", "500000", "--val-fraction", "0.01", "--quiet"]
    straight = cli(*args, "--out", str(tmp_path / "straight"), "--workers", "2")
    assert straight.returncode == 0, straight.stderr
    stopped = tmp_path / "stopped"
    proc = subprocess.Popen([sys.executable, "-m", "monotile", *args, "--out", str(stopped),
                             "--workers", "1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    index, deadline = stopped / "index.json", time.time() + 120
    while time.time() < deadline and not (
            index.exists() and len(json.loads(index.read_text())["splits"]["train"]["shards"])
            >= 2):
        time.sleep(0.01)
    proc.send_signal(how)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == (-9 if how == signal.SIGKILL else 130), err
    state = json.loads(index.read_text())
    assert not state["complete"] and len(state["splits"]["train"]["shards"]) >= 2
    if how == signal.SIGINT:
        assert "run the same command to continue" in err
    again = cli(*args, "--out", str(stopped), "--workers", "2", "--json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["resumed"] is True
    assert files(stopped) == files(tmp_path / "straight")
    assert not list(stopped.glob(".*.part"))
    done = cli(*args, "--out", str(stopped))
    assert done.returncode == 0 and "is prepared already" in done.stdout


def test_a_damaged_shard_is_found_by_its_checksum_in_one_line(tmp_path, corpus, bpe):
    out = tmp_path / "shards"
    prepare_shards([corpus], bpe, out, shard_tokens=50_000, val_fraction=0.05, workers=1)
    shard = out / "train-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[1234] ^= 0x01
    shard.write_bytes(bytes(raw))
    with pytest.raises(DataError, match="train-00001.bin differs from its SHA-256"):
        verify(out)
    args = ["prepare", "text", "--data", str(corpus), "--tokenizer", str(bpe), "--out", str(out),
            "--shard-tokens", "50000", "--val-fraction", "0.05"]
    again = cli(*args)
    assert again.returncode == 2 and again.stderr.count("\n") == 1, again.stderr
    assert "train-00001.bin differs from its SHA-256" in again.stderr
    shard.write_bytes(bytes(raw[:-2]))  # truncated: training sees it at once
    trained = cli("train", "text", "--data", str(out), "--out", str(tmp_path / "run"),
                  *set_args(TINY))
    assert trained.returncode == 2 and "train-00001.bin has" in trained.stderr, trained.stderr
    assert not (tmp_path / "run").exists()


def bad_inputs(tmp: Path, corpus: Path, bpe: Path) -> list[tuple[str, list[str], str]]:
    (tmp / "empty").mkdir()
    (tmp / "table.csv").write_text("a,b\n1,2\n")
    (tmp / "chat.jsonl").write_text(json.dumps({"messages": [{"role": "user",
                                                              "content": "hi"}]}) + "\n")
    (tmp / "foreign").mkdir()
    (tmp / "foreign" / "notes.md").write_text("mine\n")
    good = ["--tokenizer", str(bpe), "--out", str(tmp / "out")]
    return [
        ("empty folder", ["--data", str(tmp / "empty"), *good], "has no .txt, .jsonl, .parquet"),
        ("unknown type", ["--data", str(tmp / "table.csv"), *good], "is a .csv file"),
        ("missing path", ["--data", str(tmp / "nothing.txt"), *good], "does not exist"),
        ("missing column", ["--data", str(corpus / "c_speeches.parquet"), "--column", "body",
                            *good], "has no column 'body' (its columns: year, text)"),
        ("chat records", ["--data", str(tmp / "chat.jsonl"), *good],
         "line 1 has no 'text' field: chat and instruction records train in memory"),
        ("wrong tokenizer", ["--data", str(corpus), "--tokenizer", str(tmp / "no-run"),
                             "--out", str(tmp / "out")], "no tokenizer.json there"),
        ("foreign folder", ["--data", str(corpus), "--tokenizer", str(bpe), "--out",
                            str(tmp / "foreign")], "is not empty and holds no index.json"),
        ("bad fraction", ["--data", str(corpus), *good, "--val-fraction", "1.5"],
         "--val-fraction 1.5 is invalid"),
    ]


def test_bad_input_to_prepare_is_one_line_and_exit_2(tmp_path, corpus, bpe):
    for name, args, message in bad_inputs(tmp_path, corpus, bpe):
        done = cli("prepare", "text", *args)
        assert done.returncode == 2, (name, done.stderr)
        assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, \
            (name, done.stderr)
        assert message in done.stderr, (name, done.stderr)
    # the same arguments but another setting: the folder's shards are not mixed with others
    prepare_shards([corpus], bpe, tmp_path / "made", val_fraction=0.05, workers=1)
    done = cli("prepare", "text", "--data", str(corpus), "--tokenizer", str(bpe), "--out",
               str(tmp_path / "made"), "--val-fraction", "0.1")
    assert done.returncode == 2 and "val_fraction was 0.05, now 0.1" in done.stderr


# ---- training on shards -------------------------------------------------------------------

STEPS = dict(TINY, max_steps="24", eval_interval="12", checkpoint_interval="4",
             log_interval="4")


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shakespeare_text, chars) -> Path:
    """All of Tiny Shakespeare, by character, in shards of 200,000: five for training and
    a tenth of its paragraphs for validation."""
    folder = tmp_path_factory.mktemp("shakespeare")
    (folder / "input.txt").write_text(shakespeare_text, encoding="utf-8")
    prepare_shards([folder / "input.txt"], chars, folder / "shards", shard_tokens=200_000,
                   val_fraction=0.1, workers=2)
    return folder / "shards"


def test_windows_are_drawn_as_in_memory_and_never_cross_a_shard_end(shards, chars):
    s = TokenShards(shards)
    assert len(s.sizes["train"]) == 5
    tok = Tokenizer.load(chars)
    texts = [tok.decode(np.asarray(s.shard("train", k)).tolist()) for k in range(5)]
    windows = s.windows("train", torch.Generator().manual_seed(0), 64, 32)
    for _ in range(20):
        x, y = next(windows)
        assert torch.equal(x[:, 1:], y[:, :-1])
        for row in torch.cat([x, y[:, -1:]], 1):
            assert any(tok.decode(row.tolist()) in t for t in texts)
    one = TokenShards.__new__(TokenShards)  # the first shard alone: nanoGPT's own draw
    one.__dict__.update(s.__dict__, sizes={"train": s.sizes["train"][:1]})
    data = torch.from_numpy(np.asarray(s.shard("train", 0), dtype=np.int64))
    got = next(one.windows("train", torch.Generator().manual_seed(3), 8, 32))
    starts = torch.randint(len(data) - 32, (8,), generator=torch.Generator().manual_seed(3))
    window = data[starts[:, None] + torch.arange(33)]
    assert torch.equal(got[0], window[:, :-1]) and torch.equal(got[1], window[:, 1:])
    # a process's rows of the global batch: every process draws the same starts
    whole = next(s.windows("train", torch.Generator().manual_seed(5), 8, 32))
    part = next(s.windows("train", torch.Generator().manual_seed(5), 8, 32, rows=slice(4, 8)))
    assert torch.equal(part[0], whole[0][4:]) and torch.equal(part[1], whole[1][4:])


def test_a_run_on_shards_takes_their_tokenizer_and_evaluates_on_their_val_split(
        tmp_path, shards, chars):
    run = monotile.train("text", "speeches-bpe", out=tmp_path / "run", data=shards,
                         overrides=dict(STEPS), quiet=True)
    assert run.task.config.tokenizer == "char"  # the shards', whatever the preset said
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    assert run.configs["model"].vocab_size == Tokenizer.load(chars).vocab_size
    assert run.state["last_eval"]["val_tokens"] == 2000  # eval_tokens, of the val shards
    index = json.loads((shards / "index.json").read_text())
    assert index["splits"]["val"]["tokens"] > 2000
    again = monotile.load(tmp_path / "run")  # eval of the finished run reads them again
    assert again.evaluate()["val_loss"] == pytest.approx(run.state["last_eval"]["val_loss"])


def test_kill_9_mid_training_on_shards_then_resume_equals_straight_run(tmp_path, shards):
    args = ["train", "text", "--preset", "shakespeare-char", "--data", str(shards), "--quiet",
            *set_args(dict(STEPS, max_steps="200", eval_interval="200"))]
    assert cli(*args, "--out", str(tmp_path / "straight")).returncode == 0
    assert 40 <= kill_9_at_step(args, tmp_path / "killed", 40) < 200
    result = cli("resume", str(tmp_path / "killed"), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["step"] == 200
    a, b = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("straight", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node N -m monotile ARGS` (gloo on CPU)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "monotile", *args],
                          capture_output=True, text=True, timeout=300, env=env)


def test_two_processes_on_shards_train_the_model_one_process_trains(tmp_path, shards):
    small = {"n_layer": "2", "n_head": "2", "d_model": "32", "context": "16",
             "batch_size": "8", "max_steps": "6", "eval_interval": "3", "log_interval": "1",
             "warmup_steps": "2", "eval_tokens": "2000", "seed": "0"}
    monotile.train("text", out=tmp_path / "one", data=shards, overrides=dict(small), quiet=True)
    done = torchrun("train", "text", "--data", str(shards), "--out", str(tmp_path / "two"),
                    "--strategy", "ddp", "--quiet", *set_args(small))
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = (load_file(str(tmp_path / r / "model.safetensors")) for r in ("one", "two"))
    assert sorted(one) == sorted(two)
    for name in one:
        torch.testing.assert_close(one[name], two[name], atol=1e-5, rtol=1e-4, msg=name)
