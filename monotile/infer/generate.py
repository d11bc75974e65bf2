"""Autoregressive decoding with a KV cache, and the sampling rules applied to each step.

x_{t+1} ~ softmax(top_p(top_k(penalise(logits_t) / T))), in Hugging Face's order:
  repetition penalty r: a logit l of a token already in the sequence becomes l / r if l > 0,
  else l r
  temperature T (T = 0 means greedy: argmax)
  top-k: keep the k largest logits
  top-p (nucleus): keep the smallest set of tokens whose probabilities sum to at least p
then one token drawn from those probabilities by the inverse of their cumulative sum (draw).
The KV cache keeps each layer's keys and values, so a step feeds one token instead of the whole
prefix; `use_cache=False` recomputes the prefix (nanoGPT's way) and is tested to give the same
tokens. When the sequence fills the context, a fresh cache is filled with the last half of the
tokens and decoding goes on from there (the effect of llama.cpp's context shift); the
recompute path slides a full-context window instead, so past the context the two differ.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, ConfigError


@dataclass(frozen=True, kw_only=True)
class Sampling:
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not 0 <= self.temperature < float("inf"):  # nan too
            raise ConfigError(f"temperature={self.temperature} is invalid: it must be a number "
                              ">= 0 (0 means greedy)")
        if self.top_k is not None and self.top_k <= 0:
            raise ConfigError(f"top_k={self.top_k} is invalid: it must be a positive integer")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} is invalid: it must be in (0, 1]")
        if not 0 < self.repetition_penalty < float("inf"):
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} is invalid: it "
                              "must be > 0 (1 means no penalty)")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float):
    """logits (B, V); seen (B, T) token ids. l -> l / r if l > 0 else l * r, for seen tokens."""
    if penalty == 1.0:
        return logits
    picked = logits.gather(1, seen)
    picked = torch.where(picked > 0, picked / penalty, picked * penalty)
    return logits.scatter(1, seen, picked)


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties: l_j - c_j * frequency - [c_j > 0] * presence, with c_j the number of
    times token j was generated so far. logits and counts: (..., V)."""
    if presence == 0 and frequency == 0:
        return logits
    counts = counts.to(logits.dtype)
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Set every logit below the k-th largest of its row to -inf."""
    k = min(k, logits.size(-1))
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass is >= p."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs       # mass of the more likely tokens
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False                  # the top token always stays, even for p ~ 0
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def check_seed(seed: int | None) -> None:
    """A sampling seed is a whole number PyTorch's generators take: 0 to 2**64 - 1."""
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not 0 <= seed < 2**64):
        raise ConfigError(f"seed={seed!r} is invalid: give a whole number from 0 to 2**64 - 1")


NAN_OUTPUT = ("the model's output is NaN: its weights hold NaN or inf (a diverged or damaged "
              "checkpoint); load another checkpoint (--checkpoint best) or train again")


def next_token(logits: torch.Tensor, seen: torch.Tensor | None, s: Sampling,
               generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits (B, V) under the sampling rules; returns (B,) ids.
    `seen` (B, T), the ids so far, only matters for a repetition penalty (None without one).
    Logits holding NaN (weights that are NaN: a diverged or damaged checkpoint) are refused,
    where argmax would quietly pick a token and a draw fail with a riddle."""
    if s.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits.float(), seen, s.repetition_penalty)
    # one pass over the vocabulary finds the largest logit and NaN (max propagates it); its
    # index is argmax's (the first of equal values)
    top, token = logits.max(-1, keepdim=True)
    if torch.isnan(top).any():
        raise CheckpointError(NAN_OUTPUT)
    if s.temperature == 0:
        return token[:, 0]
    # divide after taking out the largest logit: a tiny temperature then tends to greedy
    # instead of overflowing to inf - inf = nan (in float64 below float32's smallest normal
    # number: a temperature like 1e-300 is 0 in float32)
    if s.temperature >= 1e-30:
        logits = (logits.float() - top) / s.temperature
    else:
        logits = ((logits - top).double() / s.temperature).float()
    if s.top_k is not None:
        logits = top_k_filter(logits, s.top_k)
    if s.top_p is not None and s.top_p < 1:
        logits = top_p_filter(logits, s.top_p)
    return draw(logits.exp(), generator)


def draw(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row of weights (B, V) >= 0, with probability w_j / sum(w), by the inverse
    of the cumulative distribution: with C_j = w_0 + ... + w_j (in float64) and u ~ U[0, 1)
    from `generator`, the first j with C_j > u C_V. One uniform number and one running sum
    a row, where torch.multinomial draws V exponential numbers (1 ms for a 49,152-token
    vocabulary, 20x this); an index of weight 0 is never drawn."""
    total = weights.double().cumsum(-1)
    u = torch.rand(weights.size(0), 1, dtype=torch.float64, generator=generator,
                   device=weights.device)
    last = total[:, -1:]
    # u C_V may round up to C_V itself: at most the largest float64 below it
    at = torch.minimum(u * last, torch.nextafter(last, torch.zeros_like(last)))
    return torch.searchsorted(total, at, right=True)[:, 0]


@torch.no_grad()
def generate_ids(model, prompt: torch.Tensor, max_new_tokens: int, sampling: Sampling,
                 *, seed: int | None = None, use_cache: bool = True) -> Iterator[torch.Tensor]:
    """Yield (B,) new token ids one step at a time. prompt: (B, T) ids, T <= the context.

    `model(ids, cache=, pos=, last=)` returns logits (B, T, V), or (B, 1, V) of the last
    position with `last`; `model.trunk` makes the cache."""
    context = model.trunk.cfg.context
    device = next(model.parameters()).device
    check_seed(seed)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    seq = prompt.to(device)
    if seq.size(1) > context:
        raise ValueError(f"prompt of {seq.size(1)} tokens exceeds the context {context}")
    was_training = model.training
    model.eval()
    try:
        if use_cache:  # room for what this call can reach (a whole context's cache of a
            # 30-layer model in fp32 is hundreds of MB)
            cache = model.trunk.make_cache(seq.size(0),
                                           min(context, seq.size(1) + max_new_tokens))
            logits = model(seq, cache=cache, pos=0, last=True)[:, -1]
            pos = seq.size(1)
        token = seq[:, -1]  # the last token fed, (B,): a step feeds it as (B, 1)
        for i in range(max_new_tokens):
            if not use_cache:
                logits = model(seq[:, -context:], last=True)[:, -1]
            elif i > 0 and pos == context:  # context full: keep the last half, re-prefill it
                keep = seq[:, -(context // 2):]
                cache = model.trunk.make_cache(seq.size(0))
                logits = model(keep, cache=cache, pos=0, last=True)[:, -1]
                pos = keep.size(1)
            elif i > 0:  # one token: through the compiled step where compile_decoding made one
                logits = getattr(model, "decode_step", model)(token[:, None], cache=cache,
                                                               pos=pos, last=True)[:, -1]
                pos += 1
            token = next_token(logits, seq, sampling, generator)
            seq = torch.cat([seq, token[:, None]], dim=1)
            yield token
    finally:
        model.train(was_training)


def compile_decoding(model, prepack: bool = True) -> float:
    """Compile `model`'s one-token step with a KV cache (torch.compile: inductor's C++ kernels,
    the weights frozen into the program as constants, one program for every position, cache
    length and batch of one row) and run it once, so that the compile is paid here; returns
    the seconds it took. generate_ids then steps through it (`model.decode_step`); a prompt's
    prefill stays as it is (a few large products, where the eager kernels are at their best).

    A step in eager PyTorch runs ~50 operators a layer, each paying the dispatcher and a cache
    that the weights just streamed through; compiled, they are four fused loops, the
    attention and four products a layer. Run.optimize_for_inference(compile=True) also puts
    the int8, int4 and bf16 layers in native.py's kernels (fp32 ones where they measure
    faster there): SmolLM2 then decodes 1.4x (fp32)
    to 3.0x (int4) faster than eager on 2 threads (bench/real_models.py --compile), for
    15-25 s of compiling at each start (inductor keeps its work on disk, so a later start
    compiles less) and the compiler's memory (~300 MB). Float layers must be plain nn.Linear
    or native (convert(pack=False)): the compiler packs frozen weights itself, unless
    `prepack` is False."""
    import time
    start = time.perf_counter()
    # dynamo checks, before each call, that the model is as it was compiled: thousands of
    # checks on its modules' attributes and hooks. The model is frozen for inference, so only
    # its tensors' identities are kept: they tell its program from another model's (two
    # models of one class in one process must not run each other's)
    options = {"guard_filter_fn": _identity_guards} if _GUARD_FILTERS else None
    compiled = torch.compile(model.forward, dynamic=True, options=options)
    # cpp_wrapper: the calls between kernels made in C++ too, not in a Python function (a
    # step of SmolLM2 is ~270 calls: int4 decoded 156 tokens/s instead of 149 when measured,
    # for a first compile of 43 s instead of 22)
    options = {"freezing": True, "cpp.weight_prepack": prepack, "cpp_wrapper": True}

    def step(*args, **kwargs):  # a later compile (another batch size) is made the same way
        with torch._inductor.config.patch(options):
            return compiled(*args, **kwargs)
    device = next(model.parameters()).device
    # a typical length (the compiler tunes its loops for the sizes it first sees; 0 and 1
    # it would compile as constants)
    length = min(model.trunk.cfg.context, 512)
    # every position's rotations before the compile: the step bakes the table in, and a table
    # made longer later would compile it again (convert keeps a short one)
    model.trunk.reserve_positions(model.trunk.cfg.context)
    cache = model.trunk.make_cache(1, length)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            step(torch.zeros(1, 1, dtype=torch.long, device=device), cache=cache,
                 pos=length // 2, last=True)
    except Exception as e:  # noqa: BLE001  (no C++ compiler, an operator it cannot lower)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise ConfigError(f"the decoding step could not be compiled ({first}); torch.compile "
                          "on CPU needs a C++ compiler (g++): install one, or decode without "
                          "compiling") from None
    finally:
        model.train(was_training)
    model.decode_step = step
    return time.perf_counter() - start


_GUARD_FILTERS = hasattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe")  # 2.8+


def _identity_guards(entries) -> list[bool]:
    """Of dynamo's guards, keep those not on the modules, and the modules' tensor ids."""
    return [e.guard_type == "ID_MATCH" or not e.orig_guard.source.is_unspecialized_nn_module()
            for e in entries]


class TextPieces:
    """Token ids in, text pieces out, ending before the first stop string or at an end id.

    The text of all ids so far is decoded again at each token (a token may complete a
    multi-byte character, or change how its neighbours decode), and the last
    len(longest stop) - 1 characters are held back until they cannot begin a stop string.
    Decoding leaves special tokens out; stop strings are matched against the text with each
    special token's text (`specials`: id -> text) put back where it came, so "<|im_end|>"
    stops too. An id of `end_ids` (the model's end of sequence) ends the text, unshown."""

    def __init__(self, decode, stop: list[str] | None = None, *,
                 specials: dict[int, str] | None = None, end_ids=()):
        self.decode, self.stop = decode, [s for s in (stop or []) if s]
        self.specials, self.end_ids = specials or {}, frozenset(int(i) for i in end_ids)
        self.ids: list[int] = []
        self.marks: list[tuple[int, str]] = []  # (offset in the decoded text, special's text)
        self.sent = 0  # characters of the decoded text already given out
        self.hold = max((len(s) for s in self.stop), default=1) - 1
        self.stopped = False

    def push(self, token: int) -> str:
        """The new text that token `token` makes final ("" if none); sets .stopped at a stop
        string or an end id."""
        token = int(token)
        if token in self.end_ids:
            self.stopped = True
            return self._rest()
        self.ids.append(token)
        text = self.decode(self.ids)
        if token in self.specials:
            self.marks.append((len(text), self.specials[token]))
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        cut = self._stop_at(text) if self.stop else -1
        if cut >= 0:
            self.stopped = True
            piece = text[self.sent:cut] if cut > self.sent else ""
            self.sent = max(self.sent, cut)
            return piece
        ready = len(text) - self.hold  # keep back what could be the start of a stop string
        if ready > self.sent:
            piece, self.sent = text[self.sent:ready], ready
            return piece
        return ""

    def flush(self) -> str:
        """What is left once generation ends without a stop string or end id."""
        return "" if self.stopped else self._rest()

    def _rest(self) -> str:
        text = self.decode(self.ids)
        piece, self.sent = text[self.sent:], max(self.sent, len(text))
        return piece

    def _stop_at(self, text: str) -> int:
        """Where in `text` the first stop string begins, -1 if none does (searched from what
        was held back)."""
        seen = self._with_specials(text)
        start = self._in_seen(max(0, self.sent - self.hold))
        cut = min((i for i in (seen.find(s, start) for s in self.stop) if i >= 0), default=-1)
        return self._in_text(cut) if cut >= 0 else -1

    def _with_specials(self, text: str) -> str:
        """The decoded text with the special tokens' texts put back at their offsets."""
        out, at = [], 0
        for offset, special in self.marks:
            out += [text[at:offset], special]
            at = offset
        return "".join(out) + text[at:]

    def _in_seen(self, i: int) -> int:
        """Offset i of the decoded text in _with_specials' text (before specials at i)."""
        return i + sum(len(special) for offset, special in self.marks if offset < i)

    def _in_text(self, i: int) -> int:
        """Offset i of _with_specials' text in the decoded text (a special's start, inside
        one)."""
        shift = 0
        for offset, special in self.marks:
            if i < offset + shift:
                break
            if i < offset + shift + len(special):
                return offset
            shift += len(special)
        return i - shift
