"""The text task end to end: it learns real text, reports honest metrics, generates, and the
command line wraps the Python API."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import monotile
from monotile.errors import MonotileError
from monotile.tokenizers import Tokenizer

from conftest import TINY, cli, set_args


def test_a_small_model_learns_shakespeare(tmp_path, shakespeare):
    """200 steps of the preset's model reach a held-out loss far below the entropy of the
    character frequencies (3.31 nats; a uniform guess over 65 characters is 4.17)."""
    run = monotile.train("text", "shakespeare-char", out=tmp_path / "run",
                         overrides=dict(max_steps="200", eval_interval="200",
                                        eval_tokens="20000"), quiet=True)
    text = shakespeare.read_text()
    counts = torch.tensor([text.count(c) for c in sorted(set(text))], dtype=torch.float64)
    p = counts / counts.sum()
    unigram = -(p * p.log()).sum().item()
    val = run.state["last_eval"]["val_loss"]
    assert val < unigram - 0.5, (val, unigram)


def test_evaluate_is_mean_next_token_cross_entropy_and_bpb_follows(tiny_run):
    task, model = tiny_run.task, tiny_run.model
    figures = tiny_run.evaluate()
    data = task.split("val")[: task.config.eval_tokens + 1]
    T = task.context
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, len(data) - 1, T):
            w = data[s:s + T + 1]
            logits = model(w[None, :-1])[0]
            nll += F.cross_entropy(logits, w[1:], reduction="sum").item()
            n += len(w) - 1
    assert figures["val_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert figures["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)
    # ASCII characters are one byte each, so bits per byte is the loss in bits
    assert figures["bits_per_byte"] == pytest.approx(nll / n / math.log(2), rel=1e-5)


def test_bpe_token_bytes_add_up_to_the_utf8_length(shakespeare):
    text = shakespeare.read_text()[:20000] + " café naïve — ünïcödé"
    tok = Tokenizer.train_bpe(text, 400)
    ids = tok.encode(text)
    sizes = tok.token_bytes()
    assert sum(sizes[i] for i in ids) == len(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_a_bpe_let_go_decodes_as_the_tokenizer_did_and_encodes_by_reading_it_again(
        shakespeare, tmp_path):
    """let_go keeps a byte-level BPE's token bytes only: every id, and ids that cut a
    multi-byte character (U+FFFD) or hold a special token (left out), decode to the Hugging
    Face tokenizer's own text; encode reads the file again."""
    text = shakespeare.read_text()[:20000] + " café naïve — ünïcödé 日本語 🎉"
    trained = Tokenizer.train_bpe(text, 400)
    trained.tok.add_special_tokens(["<|end|>"])
    # added tokens that are not special, shown: spelled in the byte alphabet, partly in it
    # ("ü" is byte 0xFC there), and outside it (its own UTF-8)
    trained.tok.add_tokens(["ROMEO:", "ünï", "→ 日"])
    assert not trained.let_go()  # no file to read it from again: kept
    trained.save(tmp_path / "tokenizer.json")
    hf, kept = (Tokenizer.load(tmp_path / "tokenizer.json") for _ in "ab")
    assert kept.let_go() and kept._tok is None
    ids = hf.encode(text[-300:] + "<|end|> ROMEO: hi ünï → 日")
    for i in range(hf.vocab_size):
        assert kept.decode([i]) == hf.decode([i])
    gen = torch.Generator().manual_seed(0)
    for _ in range(300):  # random ids: cut characters, specials, anything
        some = torch.randint(0, hf.vocab_size, (int(torch.randint(1, 20, (1,), generator=gen)),),
                             generator=gen).tolist()
        assert kept.decode(some) == hf.decode(some)
    for n in range(len(ids) + 1):  # each prefix of a text, as TextPieces decodes it
        assert kept.decode(ids[:n]) == hf.decode(ids[:n])
    assert "\ufffd" in kept.decode(hf.encode("日本")[:1])  # half a character
    assert "<|end|>" not in kept.decode(ids) and "ROMEO:" in kept.decode(ids)
    assert kept.special_texts() == hf.special_texts() == {hf.tok.token_to_id("<|end|>"):
                                                          "<|end|>"}
    travelled = Tokenizer.from_decoding_state(json.loads(json.dumps(kept.decoding_state())))
    assert travelled.decode(ids) == hf.decode(ids) and travelled._tok is None  # as JSON
    assert travelled.special_texts() == hf.special_texts()
    assert (travelled.kind, travelled.vocab_size) == (hf.kind, hf.vocab_size)
    assert kept.encode("naïve 🎉") == hf.encode("naïve 🎉")  # the file read again
    char = Tokenizer.train_char(text)
    char.save(tmp_path / "char.json")
    assert not Tokenizer.load(tmp_path / "char.json").let_go()  # not byte-level: kept


def test_llama_style_bpe_run_reports_bits_per_byte(tmp_path, shakespeare):
    data = tmp_path / "speech.txt"
    data.write_text(shakespeare.read_text()[:40000])
    run = monotile.train("text", "speeches-bpe", out=tmp_path / "run", data=data, quiet=True,
                         overrides=dict(TINY, bpe_vocab="300", n_kv_head="1"))
    figures = run.state["last_eval"]
    assert run.task.tokenizer.kind == "bpe" and run.task.tokenizer.vocab_size == 300
    assert 0 < figures["bits_per_byte"] < 8
    cfg = json.loads((run.dir / "config.json").read_text())["model"]
    assert (cfg["norm"], cfg["mlp"], cfg["positions"], cfg["bias"]) == \
        ("rmsnorm", "swiglu", "rope", False)
    assert isinstance(run.generate("The ", max_new_tokens=10, seed=0), str)


def test_python_api_load_generate_evaluate(tiny_run):
    run = monotile.load(tiny_run.dir)
    assert run.evaluate()["val_loss"] == pytest.approx(tiny_run.state["last_eval"]["val_loss"],
                                                       rel=1e-5)
    a = run.generate("ROMEO:", max_new_tokens=30, temperature=0.8, seed=7)
    assert a == run.generate("ROMEO:", max_new_tokens=30, temperature=0.8, seed=7)
    assert 0 < len(a) <= 30
    assert "".join(run.stream("ROMEO:", max_new_tokens=30, temperature=0.8, seed=7)) == a


def test_a_prompt_of_token_ids_continues_as_its_text_does_and_bad_ids_are_refused(tiny_run):
    ids = tiny_run.task.encode_prompt("ROMEO:")
    assert tiny_run.generate(ids, max_new_tokens=20, temperature=0) == \
        tiny_run.generate("ROMEO:", max_new_tokens=20, temperature=0)
    vocab = tiny_run.task.tokenizer.vocab_size
    for bad in ([vocab], [-1], [1.5], [True], []):
        with pytest.raises(MonotileError, match="0 to|empty"):
            tiny_run.generate(bad, max_new_tokens=2)


def test_before_weights_sees_the_task_before_the_model_is_built(tiny_run):
    seen = []

    def first(run):  # the task ready, no model yet
        seen.append((run.model, run.task.encode_prompt("ROMEO:")))
        raise RuntimeError("stop here")
    with pytest.raises(RuntimeError, match="stop here"):
        monotile.load(tiny_run.dir, dtype="int8", before_weights=first)
    assert seen == [(None, tiny_run.task.encode_prompt("ROMEO:"))]
    for dtype in (None, "int4"):  # as the weights are read, or all at once
        run = monotile.load(tiny_run.dir, dtype=dtype,
                            before_weights=lambda run: seen.append(run.model))
        assert seen[-1] is None and run.model is not None
        assert len(run.generate("ROMEO:", max_new_tokens=5, temperature=0)) == 5
    assert monotile.load(tiny_run.dir, before_weights=seen.append).evaluate() == \
        tiny_run.evaluate()  # the same weights read


def test_stream_yields_the_text_piece_by_piece_as_it_is_produced(tiny_run):
    pieces = tiny_run.stream("ROMEO:", max_new_tokens=30, temperature=0.8, seed=7)
    first = next(pieces)  # available before the rest has been generated
    rest = list(pieces)
    assert first and len(rest) >= 10
    assert first + "".join(rest) == tiny_run.generate("ROMEO:", max_new_tokens=30,
                                                      temperature=0.8, seed=7)


def test_stop_string_ends_the_text_before_it(tiny_run):
    free = tiny_run.generate("First", max_new_tokens=60, temperature=0)
    stop = free[20:23]
    stopped = tiny_run.generate("First", max_new_tokens=60, temperature=0, stop=stop)
    assert stopped == free[:free.index(stop)]


def test_prompt_longer_than_the_context_is_cropped_with_a_warning(tiny_run):
    with pytest.warns(UserWarning, match="only its last 32 tokens are used"):
        text = tiny_run.generate("To be or not to be " * 10, max_new_tokens=5, seed=0)
    assert len(text) == 5


def test_cli_train_eval_generate(tmp_path, small_text):
    out = tmp_path / "run"
    r = cli("train", "text", "--preset", "shakespeare-char", "--data", str(small_text),
            "--out", str(out), "--json", *set_args(TINY))
    assert r.returncode == 0, r.stderr
    trained = json.loads(r.stdout)
    assert trained["step"] == 40 and trained["val_loss"] < 4.0
    for name in ("config.json", "model.safetensors", "best.safetensors", "tokenizer.json",
                 "trainer_state.json", "optimizer.safetensors", "metrics.jsonl",
                 "plots/loss.png"):
        assert (out / name).exists(), name

    r = cli("eval", str(out), "--json")
    assert r.returncode == 0, r.stderr
    figures = json.loads(r.stdout)
    assert figures["val_loss"] == pytest.approx(trained["val_loss"], rel=1e-5)
    assert set(figures) >= {"val_loss", "perplexity", "bits_per_byte"}

    gen = ["generate", str(out), "--prompt", "KING", "--max-new-tokens", "30",
           "--temperature", "0.9", "--top-k", "20", "--top-p", "0.95",
           "--repetition-penalty", "1.1", "--seed", "5"]
    a, b = cli(*gen), cli(*gen, "--stream")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    assert a.stdout == b.stdout and len(a.stdout.strip()) > 0
    assert cli(*gen, "--json").stdout.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--preset", "shakespeare"], "unknown preset 'shakespeare'"),
    (["--preset", "shakespeare-char", "--set", "n_head=3"], "n_head=3 is invalid"),
    (["--preset", "shakespeare-char", "--set", "lr=-1"], "lr=-1.0 is invalid"),
    (["--preset", "shakespeare-char", "--set", "context=0"], "context=0 is invalid"),
    (["--preset", "shakespeare-char", "--set", "n_layers=2"], "did you mean n_layer"),
    (["--preset", "shakespeare-char", "--set", "max_steps=many"], "expected int"),
    (["--preset", "shakespeare-char", "--data", "/no/such/file.txt"], "does not exist"),
])
def test_bad_input_is_one_line_exit_2_and_no_run_directory(tmp_path, args, message):
    out = tmp_path / "run"
    r = cli("train", "text", *args, "--out", str(out))
    assert r.returncode == 2, r.stderr
    assert message in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    (b"", "is empty"), (b"\x00\x01\x02binary\x00", "looks binary"),
    (b"\xff\xfe bad utf8", "is not UTF-8"), (b"tiny", "fewer than context"),
])
def test_bad_data_files_are_refused(tmp_path, content, message):
    data = tmp_path / "data.txt"
    data.write_bytes(content)
    r = cli("train", "text", "--preset", "shakespeare-char", "--data", str(data),
            "--out", str(tmp_path / "run"))
    assert r.returncode == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "run").exists()


def test_training_into_an_existing_run_is_refused_and_loses_nothing(tiny_run):
    before = (tiny_run.dir / "model.safetensors").read_bytes()
    r = cli("train", "text", "--preset", "shakespeare-char", "--out", str(tiny_run.dir))
    assert r.returncode == 2 and "already holds a run" in r.stderr
    assert (tiny_run.dir / "model.safetensors").read_bytes() == before


def test_unknown_characters_in_the_prompt_are_refused(tiny_run):
    r = cli("generate", str(tiny_run.dir), "--prompt", "naïve ☃")
    assert r.returncode == 2 and "outside the model's vocabulary" in r.stderr


def test_missing_data_set_says_where_to_put_it(monkeypatch, tmp_path):
    from monotile.data import find_data
    from monotile.errors import DataError
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError, match="put it at .*speeches_public_domain.txt"):
        find_data("speeches/speeches_public_domain.txt.missing")


def test_data_command_lists_the_data_sets():
    r = cli("data", "--json")
    assert r.returncode == 0, r.stderr
    rows = {row["name"]: row for row in json.loads(r.stdout)}
    assert rows["tinyshakespeare/input.txt"]["path"].endswith("tinyshakespeare/input.txt")


def test_generate_says_what_the_prompt_lacks_from_its_child_process(tiny_run):
    """generate refuses what the prompt lacks before any weight is read (its encoding runs in
    a child process, cli.common.apart): one line and exit 2, and the text as before."""
    done = cli("generate", str(tiny_run.dir), "--prompt", "ROMEO:", "--system", "Be brief.")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines()[-1].startswith("error: --system is for runs "
                                                           "trained on chat data")
    done = cli("generate", str(tiny_run.dir), "--prompt", "ROMEO:", "--max-new-tokens", "20",
               "--temperature", "0")
    assert done.returncode == 0, done.stderr
    assert done.stdout == tiny_run.generate("ROMEO:", max_new_tokens=20, temperature=0) + "\n"


def test_cli_stop_and_prompt_understand_backslash_escapes(tiny_run):
    free = tiny_run.generate("First\n", max_new_tokens=80, temperature=0)
    assert "\n" in free
    r = cli("generate", str(tiny_run.dir), "--prompt", r"First\n", "--max-new-tokens", "80",
            "--temperature", "0", "--stop", r"\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == free[:free.index("\n")] + "\n"
