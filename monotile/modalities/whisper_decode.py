"""Whisper's decoding: one 30-s window's tokens, and a long recording window after window as
OpenAI's whisper transcribe() goes through it.

Greedy:   y_t = argmax_v s_t(v); beam search keeps the W best prefixes by sum_t log p(y_t) of the
          W x V continuations, a finished one scored sum_t log p(y_t) / its length (transformers')
Rules:    s_t = log p_t with suppressed tokens at -inf; with timestamps (OpenAI's rules) they come
          in pairs and never decrease, the first token is one <= max_initial_timestamp, and when
          log sum_ts p > max_text log p a timestamp is forced
Segments: <|t0|> text <|t1|> is the segment [t0, t1] of its window; t = index x 0.02 s
Long:     windows from frame `seek`: after one, seek = its last closed segment's t1 (the whole
          window when it ends on a single timestamp); prompt = <|startofprev|> + the last 223
          kept tokens + the start sequence, reset after a window sampled at T > 0.5
Fallback: T = 0, 0.2, ..., 1 until compression_ratio = |utf8| / |zlib(utf8)| <= 2.4 and
          mean log p >= -1 (sum_t log p(y_t) / (tokens + 1)); a window with
          p(<|nospeech|> | <|startoftranscript|>) > 0.6 and mean log p <= -1 is skipped
Words:    cross-attention of the alignment heads, filtered, aligned by DTW (whisper_timing.py)
"""

from __future__ import annotations

import math
import zlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..infer.generate import draw
from .audio import silent
from .whisper_timing import (add_word_timestamps, find_alignment, snap_to_speech,
                             voiced_frames)

if TYPE_CHECKING:
    from .whisper import TranscribeConfig, TranscribeTask, WhisperModel


# ---- one window ---------------------------------------------------------------------------

class TokenRules:
    """The filters of Whisper's decoding on scores (N, V), one row per hypothesis, in
    transformers' order: begin_suppress at the first step, suppress always, then (with
    timestamps) OpenAI's timestamp rules."""

    def __init__(self, cfg: TranscribeConfig, timestamps: bool):
        self.cfg, self.timestamps = cfg, timestamps
        self.ts = None if cfg.no_timestamps_id is None else cfg.no_timestamps_id + 1

    def __call__(self, scores: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        c, scores = self.cfg, scores.clone()
        first = not any(generated)  # the first step (rows that ended early are empty too)
        if first and c.begin_suppress:
            scores[:, list(c.begin_suppress)] = -math.inf
        if c.suppress:
            scores[:, list(c.suppress)] = -math.inf
        if self.timestamps:
            self._timestamp_rules(scores, generated, first)
        return scores

    def _timestamp_rules(self, scores, generated, first):
        ts, eos = self.ts, self.cfg.eos_id
        scores[:, self.cfg.no_timestamps_id] = -math.inf
        for row, seq in enumerate(generated):
            last = len(seq) >= 1 and seq[-1] >= ts
            penultimate = len(seq) < 2 or seq[-2] >= ts
            if last:
                if penultimate:  # a pair just closed: text (or the end) comes next
                    scores[row, ts:] = -math.inf
                else:  # an opened segment closes: a timestamp (or the end), no text
                    scores[row, :eos] = -math.inf
            stamps = [t for t in seq if t >= ts]
            if stamps:  # never decrease; after a closed pair, never repeat the last one
                floor = stamps[-1] if last and not penultimate else stamps[-1] + 1
                scores[row, ts:floor] = -math.inf
        if first:
            scores[:, :ts] = -math.inf
            if self.cfg.max_initial_timestamp is not None:
                scores[:, ts + self.cfg.max_initial_timestamp + 1:] = -math.inf
        logprobs = F.log_softmax(scores.float(), dim=-1)
        forced = logprobs[:, ts:].logsumexp(-1) > logprobs[:, :ts].max(-1).values
        scores[forced, :ts] = -math.inf


def _caches(model: WhisperModel, length: int, memory_len: int):
    """The decoder's self-attention cache and the cross-attention's, of one row each: the
    rows of a batch of beams or samples share the memory's keys and values (computed once),
    and copy the prompt's keys and values after it has run once (_prompt)."""
    return model.decoder.make_cache(1, length), model.decoder.make_cross_cache(1, memory_len)


def _prompt(model: WhisperModel, memory: torch.Tensor, prompt: list[int], rows: int,
            cache, cross) -> torch.Tensor:
    """The prompt run once (its keys and values into the caches, the memory's into `cross`),
    then the self-attention cache copied to `rows` rows; the prompt's logits (1, P, V)."""
    x = torch.tensor([prompt], device=memory.device)
    logits = model.logits(x, memory[:1], cache=cache, cross_cache=cross)
    if rows > 1:
        first = torch.zeros(rows, dtype=torch.long, device=memory.device)
        for c in cache:
            c.reorder(first)
    return logits


@torch.no_grad()
def greedy_decode(model: WhisperModel, memory: torch.Tensor, prompt: list[int],
                  rules: TokenRules, max_new_tokens: int, eos: int, *, temperature: float = 0.0,
                  best_of: int = 1, generator: torch.Generator | None = None,
                  stats: dict | None = None) -> list[int]:
    """Tokens after the prompt, argmax at each step, until <|endoftext|> (not returned). With
    temperature T > 0, `best_of` sequences are drawn together, y_t ~ softmax(s_t / T) with
    `generator`, and the one of highest sum_logprob / its length is kept (whisper's best_of
    and ranker). `stats` (a dict) receives the kept one's sum_logprob = sum_t log
    softmax(s_t)[y_t] (the end token's included, as whisper counts it), every row's (tokens,
    sum_logprob) as "samples", and prompt_logits, the logits (V,) at stats["at"], a position
    of the prompt."""
    n = best_of if temperature > 0 else 1
    cache, cross = _caches(model, len(prompt) + max_new_tokens, memory.size(1))
    logits = _prompt(model, memory, prompt, n, cache, cross)
    if stats is not None:
        stats["prompt_logits"] = logits[0, stats.get("at", -1)].float()
    logits = logits[:, -1].expand(n, -1)
    outs: list[list[int]] = [[] for _ in range(n)]
    totals, done = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.bool)
    for step in range(max_new_tokens):
        scores = rules(logits.float(), outs).cpu()
        if temperature > 0:
            weights = ((scores - scores.max(-1, keepdim=True).values) / temperature).exp()
            tokens = draw(weights, generator)  # ~ softmax(s_t / T), one uniform number a row
        else:
            tokens = scores.argmax(-1)
        if stats is not None:
            logp = F.log_softmax(scores, dim=-1).gather(1, tokens[:, None])[:, 0]
            totals += torch.where(done, 0.0, logp.double())
        tokens = tokens.masked_fill(done, eos)  # a finished row only repeats the end
        for row, token in enumerate(tokens.tolist()):
            if token != eos:
                outs[row].append(token)
        done |= tokens == eos
        if bool(done.all()) or step + 1 == max_new_tokens:
            break
        x = tokens[:, None].to(memory.device)
        logits = model.logits(x, cache=cache, cross_cache=cross, pos=len(prompt) + step)[:, -1]
    best = max(range(n), key=lambda r: totals[r] / max(1, len(outs[r])))
    if stats is not None:
        stats["sum_logprob"] = float(totals[best])
        stats["samples"] = [(o, float(t)) for o, t in zip(outs, totals)]
    return outs[best]


def _start_beams(model: WhisperModel, memory: torch.Tensor, prompt: list[int], W: int,
                 max_new_tokens: int, stats: dict | None):
    """Caches for W beams, the prompt's last logits (W, V), W empty beams and their scores:
    W copies of the prompt, of which only the first expands at the first step."""
    cache, cross = _caches(model, len(prompt) + max_new_tokens, memory.size(1))
    logits = _prompt(model, memory, prompt, W, cache, cross)
    if stats is not None:
        stats["prompt_logits"] = logits[0, stats.get("at", -1)].float()
    scores = torch.full((W,), -math.inf)
    scores[0] = 0.0
    return cache, cross, logits[:, -1].expand(W, -1), [[] for _ in range(W)], scores


@torch.no_grad()
def beam_decode(model: WhisperModel, memory: torch.Tensor, prompt: list[int],
                rules: TokenRules, max_new_tokens: int, eos: int, width: int,
                length_penalty: float = 1.0, *, stats: dict | None = None) -> list[int]:
    """Beam search as transformers' generate(num_beams=width) runs it: each step the 2 W best
    continuations by summed log-probability; one ending in <|endoftext|> among the first W (or
    any of the first W at the last step) is finished, scored sum log p / generated length; the
    best W others continue. Stops when no running beam can beat the W finished ones. `stats`
    receives the best one's sum_logprob and prompt_logits, as greedy_decode's. A run with
    beam_search="whisper" searches as OpenAI's whisper does (whisper_beam_decode)."""
    if rules.cfg.beam_search == "whisper":
        return whisper_beam_decode(model, memory, prompt, rules, max_new_tokens, eos, width,
                                   length_penalty, stats=stats)
    P, W = len(prompt), width
    cache, cross, logits, beams, scores = _start_beams(model, memory, prompt, W,
                                                       max_new_tokens, stats)
    finished: list[tuple[float, list[int], float]] = []
    for step in range(max_new_tokens):
        logprobs = rules(F.log_softmax(logits.float(), dim=-1).cpu(), beams)
        V = logprobs.size(1)
        top, index = (scores[:, None] + logprobs).flatten().topk(2 * W)
        last = step + 1 == max_new_tokens
        running, kept, rows = [], [], []
        for rank, (s, i) in enumerate(zip(top.tolist(), index.tolist())):
            b, token = divmod(i, V)
            if token == eos or last:
                if rank < W:
                    finished.append((s / (step + 1) ** length_penalty, beams[b] + [token], s))
            elif len(running) < W:
                running.append(beams[b] + [token])
                kept.append(s)
                rows.append(b)
        finished = sorted(finished, key=lambda f: f[0], reverse=True)[:W]
        if last or not running:
            break
        while len(running) < W:  # fewer live continuations than beams: pad with dead ones
            running.append(running[-1])
            kept.append(-math.inf)
            rows.append(rows[-1])
        beams, scores = running, torch.tensor(kept)
        if len(finished) == W and max(kept) / (step + 1) ** length_penalty <= finished[-1][0]:
            break  # transformers' early-stop heuristic: no running beam can improve the W
        order = torch.tensor(rows, device=memory.device)
        for c in cache:
            c.reorder(order)
        x = torch.tensor([[b[-1]] for b in beams], device=memory.device)
        logits = model.logits(x, cache=cache, cross_cache=cross, pos=P + step)[:, -1]
    top = max(finished, key=lambda f: f[0]) if finished else (0.0, beams[0], float(scores[0]))
    best = top[1]
    if stats is not None:
        stats["sum_logprob"] = top[2]
    return best[:-1] if best and best[-1] == eos else best


@torch.no_grad()
def whisper_beam_decode(model: WhisperModel, memory: torch.Tensor, prompt: list[int],
                        rules: TokenRules, max_new_tokens: int, eos: int, width: int,
                        length_penalty: float = 1.0, *, stats: dict | None = None
                        ) -> list[int]:
    """Beam search as OpenAI's whisper and CTranslate2 (faster-whisper) run it: log p =
    log softmax of the filtered scores; each step the 2 W best continuations by summed log p;
    one of the first W that ends in <|endoftext|> (any of them at the last step) is finished,
    scored sum log p / (its tokens without the end)^length_penalty, and its place taken by the
    next of the other W that does not end. Done once W are finished: the best scored."""
    P, W = len(prompt), width
    cache, cross, logits, beams, scores = _start_beams(model, memory, prompt, W,
                                                       max_new_tokens, stats)
    finished: list[tuple[float, list[int], float]] = []  # (score, tokens, sum log p)
    for step in range(max_new_tokens):
        logprobs = F.log_softmax(rules(logits.float(), beams), dim=-1).cpu()
        V = logprobs.size(1)
        top, index = (scores[:, None] + logprobs).flatten().topk(2 * W)
        candidates = [(s, *divmod(i, V)) for s, i in zip(top.tolist(), index.tolist())]
        last, spare, picked = step + 1 == max_new_tokens, W, []
        for k in range(W):
            s, b, token = candidates[k]
            if token == eos or last:
                tokens = beams[b] + ([] if token == eos else [token])
                score = s / len(tokens) ** length_penalty if tokens else -math.inf
                finished.append((score, tokens, s))
                for j in range(spare, 2 * W):  # the next live candidate takes its place
                    if candidates[j][2] != eos:
                        k, spare = j, j + 1
                        break
            picked.append(candidates[k])
        if last or len(finished) >= W:
            break
        beams = [beams[b] + [token] for _, b, token in picked]
        scores = torch.tensor([s for s, _, _ in picked])
        order = torch.tensor([b for _, b, _ in picked], device=memory.device)
        for c in cache:
            c.reorder(order)
        x = torch.tensor([[token] for _, _, token in picked], device=memory.device)
        logits = model.logits(x, cache=cache, cross_cache=cross, pos=P + step)[:, -1]
    best = max(finished, key=lambda f: f[0]) if finished else (0.0, beams[0], 0.0)
    if stats is not None:
        stats["sum_logprob"] = best[2]
    return best[1]


# ---- long recordings: when a window failed, when it holds no speech ----------------------

COMPRESSION_RATIO_MAX = 2.4  # a window's text that gzip compresses more is repeating itself
LOGPROB_MIN = -1.0           # a window whose tokens average a lower log p is unsure
NO_SPEECH_MIN = 0.6          # p(<|nospeech|>) at <|startoftranscript|> above it: maybe silence
PROMPT_RESET_TEMPERATURE = 0.5  # a window sampled hotter is not the next one's previous text


def compression_ratio(text: str) -> float:
    """len(bytes) / len(zlib(bytes)) of the text's UTF-8: repeated text compresses well."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def silence(result: dict) -> bool:
    """no_speech_prob > 0.6 and avg_logprob <= -1: whisper's no-speech rule."""
    return result["no_speech_prob"] > NO_SPEECH_MIN and result["avg_logprob"] <= LOGPROB_MIN


def failed(result: dict) -> bool:
    """compression_ratio > 2.4 or avg_logprob < -1, unless it is silence: try hotter."""
    return (result["compression_ratio"] > COMPRESSION_RATIO_MAX
            or result["avg_logprob"] < LOGPROB_MIN) and not (
        result["no_speech_prob"] > NO_SPEECH_MIN and result["avg_logprob"] < LOGPROB_MIN)


def temperatures(first: float, fallback: bool) -> tuple[float, ...]:
    """first, first + 0.2, ... up to 1.0 with fallback (whisper's 0, 0.2, ..., 1); else first."""
    if not fallback:
        return (first,)
    return tuple(round(first + 0.2 * i, 2) for i in range(int((1.0 - first) / 0.2 + 1e-6) + 1)
                 ) or (first,)


# ---- a recording, window after window ---------------------------------------------------

def decode_with_fallback(task: TranscribeTask, model: WhisperModel, memory: torch.Tensor,
                         previous: list[int], how: dict) -> dict:
    """One window's decoding: prompt = <|startofprev|> + the last 223 previous tokens + the
    start sequence; at each temperature of how["temperatures"] in turn (beam or greedy at 0,
    sampling above), kept once it passes: failed = compression_ratio > 2.4 or avg_logprob <
    -1, unless no_speech_prob > 0.6 and avg_logprob < -1 (silence: kept, to be skipped).
    When every one fails, the best avg_logprob among those with compression_ratio <= 2.4
    (faster-whisper's choice); "last_temperature" is the hottest one tried."""
    c, context = task.config, model.decoder.cfg.context
    prev_id, no_speech_id = task.special("<|startofprev|>"), how["no_speech_id"]
    head = [prev_id] + previous[-(context // 2 - 1):] if previous and prev_id else []
    prompt = head + how["start"]
    budget = min(c.max_new_tokens, context - len(prompt))
    rules = TokenRules(c, how["timestamps"])
    tries = []
    for t in how["temperatures"]:
        stats = {"at": len(head)}  # the no-speech probability is read at <|sot|>
        if t > 0 or how["method"] != "beam":
            tokens = greedy_decode(model, memory, prompt, rules, budget, c.eos_id,
                                   temperature=t, best_of=how["best_of"],
                                   generator=how["generator"], stats=stats)
        else:
            tokens = beam_decode(model, memory, prompt, rules, budget, c.eos_id,
                                 how["beam_width"], stats=stats)
        no_speech = 0.0 if no_speech_id is None else \
            float(stats["prompt_logits"].softmax(-1)[no_speech_id])
        result = {"tokens": tokens, "temperature": t,
                  "avg_logprob": stats["sum_logprob"] / (len(tokens) + 1),
                  "compression_ratio": compression_ratio(task.text(tokens)),
                  "no_speech_prob": no_speech}
        tries.append(result)
        if not failed(result):
            return dict(result, last_temperature=t)
    passed = [r for r in tries if r["compression_ratio"] <= COMPRESSION_RATIO_MAX] or tries
    return dict(max(passed, key=lambda r: r["avg_logprob"]), last_temperature=t)


def split_window(c: TranscribeConfig, tokens: list[int], seek: int, size: int,
                 timestamps: bool) -> tuple[list[dict], int, bool]:
    """(segments, next seek, single_ending) of one window at frame `seek` holding `size`
    frames, as whisper: each <|t0|> text <|t1|> closed by a next timestamp is a segment;
    seek moves to the last closed one's t1 (the unfinished text after it is decoded again
    in the next window), or by the whole window when the tokens end on a single timestamp
    (no speech after it) or have no pair of timestamps at all (then one segment)."""
    ts, stride = (c.no_timestamps_id or 0) + 1, c.time_step * c.sample_rate // c.hop
    offset = seek * c.hop / c.sample_rate
    stamp = [timestamps and t >= ts for t in tokens]
    single = len(tokens) >= 2 and stamp[-1] and not stamp[-2]
    cuts = [i for i in range(1, len(tokens)) if stamp[i] and stamp[i - 1]]
    if not cuts:
        stamps = [t for t, s in zip(tokens, stamp) if s]
        span = (stamps[-1] - ts) * c.time_step if stamps and stamps[-1] != ts else \
            size * c.hop / c.sample_rate
        return [{"start": offset, "end": offset + span, "tokens": tokens}], seek + size, single
    segments, last = [], 0
    for cut in cuts + ([len(tokens)] if single else []):
        piece = tokens[last:cut]
        segments.append({"start": offset + (piece[0] - ts) * c.time_step,
                         "end": offset + (piece[-1] - ts) * c.time_step, "tokens": piece})
        last = cut
    advance = size if single else int((tokens[last - 1] - ts) * stride)
    return segments, seek + (advance or size), single


def transcribe(task: TranscribeTask, model: WhisperModel, wave: torch.Tensor, how: dict,
               bar=None) -> dict:
    """One recording, window after window from frame `seek`: decode (with fallback); skip
    the window when no_speech_prob > 0.6 and avg_logprob <= -1; else keep its segments and
    seek as split_window says (with words: to the last word's end). The kept tokens are the
    next windows' previous text, forgotten after a window decoded at temperature > 0.5."""
    c, device = task.config, next(model.parameters()).device
    hop, rate = c.hop, c.sample_rate
    content = len(wave) // hop  # log-mel frames of the audio
    seek, kept, since, segments, last_speech = 0, [], 0, [], 0.0
    how = dict(how, generator=torch.Generator().manual_seed(0))
    while seek < content:
        previous_seek, size = seek, min(c.frames, content - seek)
        # the last window keeps the samples after its last whole frame, as its last frame has
        piece = wave[seek * hop:(seek + size) * hop if seek + size < content else len(wave)]
        offset, end = seek * hop / rate, (seek + size) * hop / rate
        if silent(piece):  # digital silence: nothing to decode
            seek += size
        else:
            memory = model.encode(task.features(piece)[None].to(device))
            result = decode_with_fallback(
                task, model, memory, kept[since:] if how["condition"] else [], how)
            if silence(result):
                seek += size
            else:
                current, seek, single = split_window(c, result["tokens"], seek, size,
                                                          how["timestamps"])
                for s in current:
                    s["text_tokens"] = [t for t in s["tokens"] if t < c.eos_id]
                if how["word_timestamps"]:
                    alignment = find_alignment(
                        model, task.tokenizer, how["align_prompt"],
                        [t for s in current for t in s["text_tokens"]], memory, size,
                        how["heads"], c.eos_id, spaces=how["spaces"])
                    last_speech = add_word_timestamps(current, alignment, offset,
                                                      last_speech)
                    ends = [w["end"] for s in current for w in s["words"]]
                    if not single and ends and ends[-1] > offset:
                        seek = max(round(ends[-1] * rate / hop), previous_seek + 1)
                for s in current:
                    text = task.text(s["text_tokens"])
                    if not text or s["start"] == s["end"]:
                        continue  # whisper clears an empty or instantaneous segment
                    kept += s["tokens"]
                    segments.append(_segment(s, text, result, offset, end,
                                                  previous_seek))
                if (not how["condition"]
                        or result["last_temperature"] > PROMPT_RESET_TEMPERATURE):
                    since = len(kept)
        if bar is not None:
            bar.update(round((min(content, seek) - previous_seek) * hop / rate, 2))
    if how["word_timestamps"] and how["snap_to_speech"]:
        snap_to_speech(segments, voiced_frames(wave, rate), hop / rate)
    return {"text": " ".join(s["text"] for s in segments),
            "duration": round(len(wave) / rate, 3), "segments": segments}


def _segment(s: dict, text: str, result: dict, offset: float, end: float,
             seek: int) -> dict:
    """A segment as predict gives it: its times kept within its window's audio, its
    window's first frame ("seek") and decoding figures, as whisper's."""
    out = {"seek": seek, "start": round(min(max(s["start"], offset), end), 3),
           "end": round(min(max(s["end"], s["start"], offset), end), 3), "text": text}
    if "words" in s:
        out["words"] = s["words"]
    out.update({k: round(result[k], 4) for k in ("temperature", "avg_logprob",
                                                  "compression_ratio", "no_speech_prob")})
    return out
