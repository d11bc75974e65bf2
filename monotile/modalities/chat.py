"""Instruction and chat data for a language model: JSONL records, a chat template, and the loss
on the answers only.

A record is {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} or
{"prompt": "...", "completion": "..."}. Messages are rendered with the run's chat template (a
Jinja template, as Hugging Face's tokenizer_config.json holds one); a prompt and completion are
joined as they are. Each token is marked as an answer token (an assistant's content and the
end of its turn, or the completion) or not; the loss averages over answer tokens alone:

    L = -(1 / |A|) sum_{t in A} log p(x_t | x_<t),   A = the answer positions

The template is written into the run's config.json, so that `generate` and the server format a
conversation exactly as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import DataError

# A plain template, in the style of a play's script: every turn is "ROLE:\n" then its text, and
# a blank line ends it. It needs only letters, a colon and newlines, so even a character model
# trained on Tiny Shakespeare can read and write it. An answer ends at the blank line (STOP).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}:\n{{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")
PLAIN_STOP = ("\n\n",)
ROLES = ("system", "user", "assistant")


@dataclass
class Example:
    pieces: list[tuple[str, bool]]  # consecutive texts, each marked as answer (True) or not
    conversation: bool = False      # from "messages" (rendered by the template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as text, by the Jinja `template` in a sandbox (a template cannot reach
    Python objects, as transformers renders them)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    env = ImmutableSandboxedEnvironment(trim_blocks=False, lstrip_blocks=False)
    try:
        return env.from_string(template).render(messages=messages,
                                                add_generation_prompt=add_generation_prompt)
    except TemplateError as e:
        raise DataError(f"the chat template does not render ({e}); fix chat_template") from None


def conversation_pieces(template: str, messages: list[dict]) -> list[tuple[str, bool]]:
    """Split a rendered conversation into prompt and answer pieces: an assistant turn's answer
    is what rendering it adds after the generation prompt of the turns before it."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = render(template, messages[:i], add_generation_prompt=True)
            full = render(template, messages[:i + 1])
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError("the chat template renders a conversation differently from its "
                                "beginning, so answers cannot be told from prompts; use a "
                                "template where each turn only appends text")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
    rest = render(template, messages)[len(done):]
    if rest:
        pieces.append((rest, False))
    return [(text, answer) for text, answer in pieces if text]


def read_jsonl(path: Path, template: str) -> list[Example]:
    """The examples of a JSONL file; a one-line DataError names the first bad line."""
    examples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not JSON ({e.msg}); give one JSON object per "
                                "line") from None
            examples.append(Example(_pieces(record, template, where),
                                    isinstance(record, dict) and "messages" in record))
    if not examples:
        raise DataError(f"{path} holds no records; give lines of {{\"messages\": [...]}} or "
                        "{\"prompt\": ..., \"completion\": ...}")
    return examples


def _pieces(record, template: str, where: str) -> list[tuple[str, bool]]:
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{where}: \"messages\" must be a non-empty list")
        for m in messages:
            if not (isinstance(m, dict) and m.get("role") in ROLES
                    and isinstance(m.get("content"), str)):
                raise DataError(f"{where}: each message needs a role ({', '.join(ROLES)}) and "
                                f"a string content; got {json.dumps(m)[:80]}")
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant message to learn")
        return conversation_pieces(template, messages)
    if isinstance(record, dict) and {"prompt", "completion"} <= set(record):
        if not all(isinstance(record[k], str) for k in ("prompt", "completion")):
            raise DataError(f"{where}: prompt and completion must be strings")
        if not record["completion"]:
            raise DataError(f"{where}: the completion is empty; there is nothing to learn")
        return [(record["prompt"], False), (record["completion"], True)]
    raise DataError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": ..., "
                    "\"completion\": ...}}")


def dialogues_from_script(text: str, max_chars: int | None = None) -> list[dict]:
    """Chat records from a play's script laid out as Tiny Shakespeare is ("NAME:\\nlines", a
    blank line between speeches): each speech as the user's message and the next speaker's
    reply as the assistant's. `max_chars` keeps pairs whose two texts are at most that long."""
    import re
    turns = []
    for block in text.split("\n\n"):
        m = re.match(r"^([A-Z][A-Za-z .']*):\n(.+)$", block.strip(), re.S)
        turns.append((m.group(1), m.group(2).strip()) if m else None)
    return [{"messages": [{"role": "user", "content": a[1]},
                          {"role": "assistant", "content": b[1]}]}
            for a, b in zip(turns, turns[1:])
            if a and b and a[0] != b[0]
            and (max_chars is None or len(a[1]) + len(b[1]) <= max_chars)]
