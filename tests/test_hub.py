"""Models by hub name: `monotile import hf ORG/NAME`, and `generate`, `chat` and `serve` taking
a hub name, a model folder or a GGUF file, resolved offline through a cache laid out the way
huggingface_hub lays it out (HF_HUB_OFFLINE=1), imported once and reused."""

from __future__ import annotations

import os

import pytest
import torch

import monotile
from monotile.tokenizers import Tokenizer as BPE

from conftest import cli

transformers = pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, shakespeare):
    """$HF_HOME holding org/tiny-llama at main, as huggingface_hub's cache has it: the files
    under snapshots/<commit>/, refs/main naming that commit."""
    home = tmp_path_factory.mktemp("hf_home")
    snapshot = home / "hub" / "models--org--tiny-llama" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(COMMIT)
    # monotile's own byte-level BPE trainer (GPT-2's pre-tokenizer and decoder)
    tok = BPE.train_bpe(shakespeare.read_text(encoding="utf-8")[:30_000], 300).tok
    tok.save(str(snapshot / "tokenizer.json"))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=64))
    model.save_pretrained(snapshot)
    return home, model


@pytest.fixture
def offline(hub, monkeypatch, tmp_path):
    home, _ = hub
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # monotile's run cache
    return tmp_path


def test_import_by_hub_name_resolves_the_cache_offline(offline, hub):
    done = cli("import", "hf", "org/tiny-llama", "--out", str(offline / "run"), "--json")
    assert done.returncode == 0, done.stderr
    run = monotile.load(offline / "run")
    x = torch.tensor([[5, 17, 42, 99]])
    with torch.no_grad():
        assert torch.allclose(run.model(x), hub[1](x).logits, atol=1e-5)
    again = cli("import", "org/tiny-llama", "--revision", "main", "--out",
                str(offline / "again"))  # the format recognised, a revision given
    assert again.returncode == 0, again.stderr


def test_generate_takes_a_hub_name_and_imports_it_once(offline):
    first = cli("generate", "org/tiny-llama", "--prompt", "ROMEO:", "--max-new-tokens", "8",
                "--temperature", "0")
    assert first.returncode == 0, first.stderr
    cached = list((offline / "cache" / "monotile" / "runs").iterdir())
    assert len(cached) == 1 and (cached[0] / "config.json").is_file()
    stamp = os.stat(cached[0] / "model.safetensors").st_mtime_ns
    second = cli("generate", "org/tiny-llama", "--prompt", "ROMEO:", "--max-new-tokens", "8",
                 "--temperature", "0")
    assert second.stdout == first.stdout  # the same model, from the cache
    assert os.stat(cached[0] / "model.safetensors").st_mtime_ns == stamp
    folder = cli("generate", str(next((offline.parent).glob("hf_home*"))) + "/hub/models--org"
                 "--tiny-llama/snapshots/" + COMMIT, "--prompt", "ROMEO:",
                 "--max-new-tokens", "8", "--temperature", "0")  # a model folder, as it is
    assert folder.returncode == 0 and folder.stdout == first.stdout, folder.stderr


def test_what_the_hub_cannot_give_is_a_one_line_error(offline):
    for args, message in ((("import", "org/not-there"), "not in the local hub cache"),
                          (("import", "org/tiny-llama", "--revision", "v9"), "not in the local"),
                          (("generate", "org/nothing", "--prompt", "hi"), "not in the local"),
                          (("import", "gguf", "org/tiny-llama"), "takes a local .gguf file")):
        done = cli(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
        assert done.stderr.count("\n") == 1, done.stderr


def test_serve_takes_a_hub_name_under_the_repositorys_name(offline):
    import httpx

    from monotile.serve.process import start_server, stop
    proc, url = start_server("org/tiny-llama")
    try:
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert [c["id"] for c in cards] == ["tiny-llama"]
        answer = httpx.post(url + "/v1/completions", json={"model": "tiny-llama",
                                                           "prompt": "ROMEO:", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
    finally:
        stop(proc)


def test_a_model_folder_edited_in_place_is_imported_again(offline, hub):
    """The cache keys a folder by its files, not by the folder's own time, which an edit of
    a file inside it leaves alone."""
    import shutil

    from monotile.interop.sources import run_dir_for
    folder = offline / "model"
    shutil.copytree(hub[0] / "hub" / "models--org--tiny-llama" / "snapshots" / COMMIT, folder)
    first = run_dir_for(folder)
    assert run_dir_for(folder) == first  # unchanged: the cached run
    weights = folder / "model.safetensors"
    stamp = os.stat(folder).st_mtime_ns
    weights.write_bytes(weights.read_bytes())  # rewritten in place
    os.utime(weights, ns=(stamp + 10**9, stamp + 10**9))
    os.utime(folder, ns=(stamp, stamp))
    assert run_dir_for(folder) != first
