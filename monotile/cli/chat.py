"""`monotile chat`: a conversation in the terminal with a text run, a model folder, a GGUF file
or a hub name, the model's chat template and generate's sampling.

Each reply streams as it is made. /reset starts again, /system TEXT sets the system message,
/exit (or Ctrl-D) leaves; Ctrl-C stops the reply being written and keeps the conversation.
When the conversation outgrows the model's context, its oldest turns are dropped (the system
message stays) and the screen says so.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import MonotileError
from ..infer import COMPILE_HELP, INFERENCE_DTYPES
from .common import finish, unescape

HELP = ("/reset: a new conversation   /system TEXT: the system message   /exit: leave "
        "(or Ctrl-D)   Ctrl-C: stop a reply")


def chat(sub) -> None:
    p = sub.add_parser("chat", help="talk with a text model in the terminal, through its chat "
                       "template (a run, a model folder, a GGUF file or a hub name)")
    p.add_argument("model", metavar="RUN", help="a run directory, a Hugging Face folder, a "
                   "GGUF file, or a hub name ORG/NAME (imported once, then cached)")
    p.add_argument("--system", metavar="TEXT", help="a system message to start with")
    p.add_argument("--max-new-tokens", type=int, default=512, help="the longest reply")
    p.add_argument("--temperature", type=float, default=0.7, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None, help="same seed, same replies")
    p.add_argument("--dtype", default="float32", choices=INFERENCE_DTYPES,
                   help="weights while decoding (bfloat16: half the bytes a token, int8 a "
                   "quarter, int4 an eighth)")
    p.add_argument("--compile", action="store_true", help=COMPILE_HELP)
    finish(p, _chat, machine=True)


def _chat(a) -> None:
    from ..interop.sources import run_dir_for
    from ..run import load
    run = load(run_dir_for(a.model), device=a.device, dtype=a.dtype, compile=a.compile)
    run.generator  # noqa: B018  (a run that makes no text is refused here, before any tokens)
    session = Session(run, system=unescape(a.system) if a.system else None,
                      options=dict(max_new_tokens=a.max_new_tokens, temperature=a.temperature,
                                   top_k=a.top_k, top_p=a.top_p, seed=a.seed,
                                   repetition_penalty=a.repetition_penalty))
    interactive = sys.stdin.isatty()
    say = print if interactive else (lambda *x, **k: None)
    template = "its chat template" if run.has_chat_template else "the plain ROLE: template"
    name = Path(a.model).name  # as the user named it, not the cache's folder for a GGUF file
    say(f"{name}: {run.parameters():,} parameters, context {session.context} tokens, "
        f"{template}.\n{HELP}")
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        except KeyboardInterrupt:  # Ctrl-C at the prompt: a new line, as a shell does
            print("\n(/exit or Ctrl-D to leave)")
            continue
        if not line.strip():
            continue
        if line.startswith("/"):
            if not session.command(line.strip()):
                break
            continue
        try:
            session.reply(line)
        except KeyboardInterrupt:  # before the first piece: the question is dropped
            if session.messages and session.messages[-1]["role"] == "user":
                session.messages.pop()
            print(" [stopped]")


class Session:
    """A conversation: the messages so far, and the run that answers them."""

    def __init__(self, run, system: str | None, options: dict):
        self.run, self.system, self.options = run, system, options
        self.context = run.configs["model"].context
        self.messages: list[dict] = []

    def command(self, line: str) -> bool:
        """Carry out a /command; False to leave."""
        name, _, rest = line.partition(" ")
        if name in ("/exit", "/quit", "/bye"):
            return False
        if name == "/reset":
            self.messages = []
            print("(a new conversation)")
        elif name == "/system":
            self.system = unescape(rest.strip()) or None
            print("(system message set)" if self.system else "(system message removed)")
        elif name == "/help":
            print(HELP)
        else:
            print(f"(unknown command {name}; {HELP})")
        return True

    def reply(self, text: str) -> None:
        """Stream the model's answer to `text`, and keep both in the conversation."""
        self.messages.append({"role": "user", "content": text})
        try:
            stream = self._stream()
        except MonotileError as e:
            self.messages.pop()
            print(f"error: {e}", file=sys.stderr)
            return
        answer = []
        try:
            for piece in stream:
                answer.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:  # Ctrl-C: this reply ends here, the conversation goes on
            stream.close()
            sys.stdout.write(" [stopped]")
        finally:  # a second Ctrl-C while the first is handled still leaves a whole turn
            self.messages.append({"role": "assistant", "content": "".join(answer)})
        sys.stdout.write("\n")
        sys.stdout.flush()

    def _stream(self):
        """The reply's text pieces; the oldest turns dropped first if the conversation with
        room for the reply does not fit the context."""
        budget = self.context - min(self.options["max_new_tokens"], self.context // 2)
        dropped = 0
        while True:
            messages = self._messages()
            n = len(self.run.task.prompt_ids(self._render(messages)))
            if n <= budget:
                break
            if len(self.messages) <= 1:
                raise MonotileError(f"the message is {n} tokens with the conversation's "
                                    f"template, more than the {budget} this model's context "
                                    "leaves for it; send a shorter one")
            self.messages = self.messages[2:]  # the oldest question and its answer
            dropped += 1
        if dropped:
            print(f"(the conversation outgrew the context of {self.context} tokens: the "
                  f"oldest {dropped} turn{'s' if dropped > 1 else ''} dropped)")
        if self.run.has_chat_template:
            return self.run.stream_chat(messages, **self.options)
        from ..modalities.chat import PLAIN_STOP
        return self.run.stream(self._render(messages), stop=list(PLAIN_STOP), **self.options)

    def _messages(self) -> list[dict]:
        return ([{"role": "system", "content": self.system}] if self.system else []) + \
            self.messages

    def _render(self, messages: list[dict]) -> str:
        """The conversation as the model reads it: the run's chat template, or the plain one
        for a run trained on plain text (as the server's chat route does)."""
        if self.run.has_chat_template:
            return self.run.task.chat_prompt(messages)
        from ..modalities.chat import PLAIN_TEMPLATE, render
        return render(PLAIN_TEMPLATE, messages, add_generation_prompt=True)
