"""Chat and instruction data: templates, answer-only loss, and generation through the template."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import monotile
from monotile.modalities.chat import (PLAIN_TEMPLATE, conversation_pieces,
                                      dialogues_from_script)

from conftest import cli, set_args

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def test_answers_are_what_an_assistant_turn_adds_after_its_generation_prompt():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Who comes?"},
                {"role": "assistant", "content": "The king."},
                {"role": "user", "content": "Why?"},
                {"role": "assistant", "content": "To see thee."}]
    assert conversation_pieces(PLAIN_TEMPLATE, messages) == [
        ("SYSTEM:\nBe brief.\n\nUSER:\nWho comes?\n\nASSISTANT:\n", False),
        ("The king.\n\n", True), ("USER:\nWhy?\n\nASSISTANT:\n", False),
        ("To see thee.\n\n", True)]
    pieces = conversation_pieces(CHATML, messages[1:3])  # a Hugging Face-style template
    assert pieces == [("<|im_start|>user\nWho comes?<|im_end|>\n<|im_start|>assistant\n", False),
                      ("The king.<|im_end|>\n", True)]


@pytest.fixture(scope="module")
def dialogues(tmp_path_factory, shakespeare):
    path = tmp_path_factory.mktemp("chat") / "dialogues.jsonl"
    records = dialogues_from_script(shakespeare.read_text(encoding="utf-8"), 39)[:400]
    records.append({"prompt": "Say: ", "completion": "amen"})
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_the_loss_counts_answer_tokens_only(dialogues, tmp_path):
    run = monotile.train("text", "shakespeare-char", out=tmp_path / "run", data=dialogues,
                         quiet=True, overrides={"n_layer": "1", "n_head": "2", "d_model": "16",
                                                "context": "64", "max_steps": "1",
                                                "eval_interval": "1"})
    task = run.task
    assert task.config.chat_template == PLAIN_TEMPLATE and task.config.chat_stop == ("\n\n",)
    x, y = next(task.batches("train", torch.Generator().manual_seed(0), 8))
    for row_x, row_y in zip(x, y):
        text = task.tokenizer.decode(row_x.tolist())
        header = "ASSISTANT:\n" if "ASSISTANT:\n" in text else "Say: "  # the completion record
        answer_at = text.index(header) + len(header)
        # the first answer token is predicted from the last prompt token, at answer_at - 1
        assert (row_y[:answer_at - 1] == -100).all()
        assert (row_y[answer_at - 1:] != -100).sum() > 0
    logits = run.model(x)
    mask = y != -100
    by_hand = -torch.log_softmax(logits, -1)[mask].gather(1, y[mask][:, None]).mean()
    torch.testing.assert_close(task.loss(run.model, (x, y)), by_hand)
    assert F.cross_entropy(logits.flatten(0, 1), y.flatten()) == task.loss(run.model, (x, y))


def test_a_chat_run_answers_through_its_template(dialogues, tmp_path):
    out = tmp_path / "chat"
    small = {"n_layer": "2", "n_head": "2", "d_model": "32", "context": "64",
             "max_steps": "150", "eval_interval": "75", "lr": "3e-3", "warmup_steps": "10"}
    done = cli("train", "text", "--preset", "shakespeare-char", "--data", str(dialogues),
               "--out", str(out), "--json", *set_args(small))
    assert done.returncode == 0, done.stderr
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    config = json.loads((out / "config.json").read_text())
    assert config["text"]["chat_template"] == PLAIN_TEMPLATE
    assert json.loads(done.stdout)["val_loss"] < first["loss"]
    done = cli("generate", str(out), "--prompt", "Who comes here?", "--temperature", "0",
               "--max-new-tokens", "60", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)["text"]
    assert answer and "\n\n" not in answer and "ASSISTANT" not in answer
    run = monotile.load(out)
    messages = [{"role": "user", "content": "Who comes here?"}]
    assert run.chat(messages, max_new_tokens=60, temperature=0.0) == answer
    raw = run.generate("USER:\nWho comes here?\n\nASSISTANT:\n", max_new_tokens=60,
                       temperature=0.0)
    assert raw.startswith(answer)  # the same tokens, without the stop


@pytest.mark.parametrize("line, message", [
    ("not json", "line 1 is not JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"messages": [{"role": "king", "content": "hi"}]}', "needs a role"),
    ('{"prompt": "a", "completion": ""}', "completion is empty"),
    ('{"text": "a"}', "expected"),
])
def test_bad_chat_records_are_refused_with_their_line(line, message, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(line + "\n")
    done = cli("train", "text", "--data", str(data), "--out", str(tmp_path / "run"))
    assert done.returncode == 2 and message in done.stderr
    assert not (tmp_path / "run").exists()


def test_a_script_becomes_speech_and_reply_records():
    script = ("ROMEO:\nShe speaks.\n\nJULIET:\nAy me!\n\nJULIET:\nO Romeo.\n\n"
              "Exeunt\n\nNURSE:\nAnon!")
    assert dialogues_from_script(script) == [{"messages": [
        {"role": "user", "content": "She speaks."}, {"role": "assistant", "content": "Ay me!"}]}]
