"""Instruction and chat data for a language model: JSONL records, a chat template, and the loss
on the answers only.

A record is {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]} or
{"prompt": "...", "completion": "..."}. Messages are rendered with the run's chat template (a
Jinja template, as Hugging Face's tokenizer_config.json holds one); a prompt and completion are
joined as they are. Each token is marked as an answer token (an assistant's content and the
end of its turn, or the completion) or not; the loss averages over answer tokens alone:

    L = -(1 / |A|) sum_{t in A} log p(x_t | x_<t),   A = the answer positions

The template is written into the run's config.json, so that `generate` and the server format a
conversation exactly as training did. A template renders as transformers' apply_chat_template
renders it (the same Jinja environment, and the special tokens as bos_token, eos_token, ...), so
an imported checkpoint's own template gives the text its model was trained on.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from datetime import datetime
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


class ChatPrompt(str):
    """A conversation as a chat template rendered it. It is encoded as transformers'
    apply_chat_template encodes one: without the special tokens the tokenizer adds to a text
    (a template writes its own BOS), where a plain prompt keeps them."""


def render(template: str, messages: list[dict], add_generation_prompt: bool = False, *,
           tokens: dict[str, str] | None = None, tools: list[dict] | None = None,
           documents: list[dict] | None = None) -> str:
    """The conversation as text, rendered as transformers' apply_chat_template renders it: the
    Jinja `template` in a sandbox (a template cannot reach Python objects) with trim_blocks
    and lstrip_blocks, seeing `messages` (keys holding None dropped), `add_generation_prompt`,
    `tools`, `documents` and the special tokens `tokens` ({"bos_token": "<s>", ...})."""
    from jinja2.exceptions import TemplateError
    messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
    try:
        return _compiled(template).render(messages=messages, tools=tools, documents=documents,
                                          add_generation_prompt=add_generation_prompt,
                                          **(tokens or {}))
    except _Refused as e:
        raise DataError(f"the chat template refuses this conversation ({_one_line(e)}); give "
                        "one it accepts (some templates take no system message, or want user "
                        "and assistant turns to alternate)") from None
    except (TemplateError, TypeError, ValueError, LookupError, ArithmeticError) as e:
        what = _one_line(e) if isinstance(e, TemplateError) else f"{type(e).__name__}: " \
            f"{_one_line(e)}"
        raise DataError(f"the chat template does not render ({what}); fix chat_template") \
            from None


class _Refused(Exception):
    """raise_exception(message) called by a template (a TemplateError inside Jinja)."""


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


@functools.lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled in transformers' environment (chat_template_utils.py): a sandbox
    with trim_blocks, lstrip_blocks and loop controls, {% generation %} blocks (which mark an
    assistant's tokens there and render their body), raise_exception, strftime_now, a tojson
    that does not escape HTML, and dict and namespace that refuse names starting with _."""
    import jinja2.ext
    import jinja2.utils
    from jinja2 import nodes
    from jinja2.exceptions import SecurityError, TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Refused(_Refused, TemplateError):
        pass

    class Generation(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # Jinja's signature, so that namespace(self=...) works
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise SecurityError(f"a namespace cannot hold {name!r} (a name starting "
                                    "with _)")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise Refused(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.now().strftime(format)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now,
                       dict=Dict(), namespace=Namespace)
    return env.from_string(template)


def conversation_pieces(template: str, messages: list[dict],
                        tokens: dict[str, str] | None = None) -> list[tuple[str, bool]]:
    """Split a rendered conversation into prompt and answer pieces: an assistant turn's answer
    is what rendering it adds after the generation prompt of the turns before it. `tokens`:
    the special tokens the template may name (see render)."""
    pieces, done = [], ""
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = render(template, messages[:i], add_generation_prompt=True, tokens=tokens)
            full = render(template, messages[:i + 1], tokens=tokens)
            if not (prompt.startswith(done) and full.startswith(prompt)):
                raise DataError("the chat template renders a conversation differently from its "
                                "beginning, so answers cannot be told from prompts; use a "
                                "template where each turn only appends text")
            pieces += [(prompt[len(done):], False), (full[len(prompt):], True)]
            done = full
    rest = render(template, messages, tokens=tokens)[len(done):]
    if rest:
        pieces.append((rest, False))
    return [(text, answer) for text, answer in pieces if text]


def read_jsonl(path: Path, template: str,
               tokens: dict[str, str] | None = None) -> list[Example]:
    """The examples of a JSONL file (conversations rendered by `template` with the special
    tokens `tokens`); a one-line DataError names the first bad line."""
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
            examples.append(Example(_pieces(record, template, where, tokens),
                                    isinstance(record, dict) and "messages" in record))
    if not examples:
        raise DataError(f"{path} holds no records; give lines of {{\"messages\": [...]}} or "
                        "{\"prompt\": ..., \"completion\": ...}")
    return examples


def _pieces(record, template: str, where: str, tokens) -> list[tuple[str, bool]]:
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
        return conversation_pieces(template, messages, tokens)
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
