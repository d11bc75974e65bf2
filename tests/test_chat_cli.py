"""`monotile chat`: a conversation in the terminal, driven through its stdin and a
pseudo-terminal as a user types it."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest

import monotile
from monotile.data import find_data

from conftest import cli

SMALL = {"n_layer": "1", "n_head": "2", "d_model": "32", "d_ff": "64", "max_steps": "30",
         "eval_interval": "30", "log_interval": "10", "warmup_steps": "3", "seed": "0",
         "context": "96", "batch_size": "4"}


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    """A character model trained on a play's speeches as user and assistant turns."""
    from monotile.modalities.chat import dialogues_from_script
    root = tmp_path_factory.mktemp("chat")
    records = dialogues_from_script(find_data("tinyshakespeare/input.txt").read_text(), 39)
    (root / "dialogues.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records[:300]))
    return monotile.train("text", "shakespeare-char", out=root / "run", quiet=True,
                          data=root / "dialogues.jsonl", overrides=SMALL)


def test_a_conversation_through_stdin_keeps_its_turns(chat_run):
    run = monotile.load(chat_run.dir)
    greedy = ["--temperature", "0", "--max-new-tokens", "12"]
    first = run.chat([{"role": "user", "content": "Good morrow."}], temperature=0,
                     max_new_tokens=12)
    second = run.chat([{"role": "user", "content": "Good morrow."},
                       {"role": "assistant", "content": first},
                       {"role": "user", "content": "Art thou well?"}], temperature=0,
                      max_new_tokens=12)
    fresh = run.chat([{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Art thou well?"}], temperature=0,
                     max_new_tokens=12)
    done = cli("chat", str(chat_run.dir), *greedy,
               input="Good morrow.\nArt thou well?\n/reset\n/system Be brief.\n"
                     "Art thou well?\n/nonsense\n/exit\nnever read\n")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [first, second]  # the second answer saw the first turn
    assert "(a new conversation)" in lines and "(system message set)" in lines
    assert fresh in lines[lines.index("(system message set)") + 1:]
    assert any(line.startswith("(unknown command /nonsense") for line in lines)


def test_the_oldest_turns_are_dropped_when_the_context_is_full(chat_run):
    done = cli("chat", str(chat_run.dir), "--temperature", "0", "--max-new-tokens", "8",
               input="".join(f"Speak on, good {who}.\n" for who in
                             ("sir", "lord", "lady", "friend", "king", "queen")))
    assert done.returncode == 0, done.stderr
    assert "the oldest 1 turn dropped" in done.stdout or "turns dropped" in done.stdout
    too_long = cli("chat", str(chat_run.dir), input="a" * 500 + "\n/exit\n")
    assert too_long.returncode == 0 and "send a shorter one" in too_long.stderr


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(chat_run):
    """In a terminal: Ctrl-C while a (very long) reply streams ends that reply only."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "monotile", "chat", str(chat_run.dir),
                             "--max-new-tokens", "1000000", "--seed", "1"],
                            stdin=follower, stdout=follower, stderr=follower,
                            start_new_session=True)
    os.close(follower)
    seen = b""

    def read_until(marker: bytes, timeout: float = 60) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen and time.monotonic() < end:
            if select.select([leader], [], [], 0.5)[0]:
                try:
                    seen += os.read(leader, 4096)
                except OSError:
                    break
        assert marker in seen, seen[-500:]
    try:
        read_until(b">>> ", timeout=120)
        banner = f"{chat_run.dir.name}: {chat_run.parameters():,} parameters, context 96 tokens"
        assert banner.encode() in seen, seen[:300]  # as the README shows it
        os.write(leader, b"Speak on.\n")
        echo = b"Speak on.\r\n"  # the terminal echoes the line; then the reply streams
        read_until(echo)
        deadline = time.monotonic() + 120
        while len(seen) - seen.index(echo) < 60 and time.monotonic() < deadline:
            if select.select([leader], [], [], 0.5)[0]:
                seen += os.read(leader, 4096)
        os.killpg(proc.pid, signal.SIGINT)
        read_until(b"[stopped]")
        read_until(b">>> ", timeout=30)  # the prompt again: the chat goes on
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)


def test_chat_refuses_what_cannot_chat(tmp_path):
    done = cli("chat", str(tmp_path / "nothing"))
    assert done.returncode == 2 and "not a run directory" in done.stderr
