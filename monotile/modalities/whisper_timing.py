"""Word timestamps of a Whisper transcript, as OpenAI's whisper (timing.py) finds them.

Weights:  A[h, n, t] = softmax_t(q_n . k_t / sqrt(d)) of the checkpoint's alignment heads h
          (cross-attention of text token n over the window's first F/2 encoder positions t,
          decoding the window's text again without its previous-text prompt)
Filter:   A <- (A - mean_n A) / std_n A, then a median over 7 positions along t; M = mean_h A
DTW:      C[i, j] = -M[i, j] + min(C[i-1, j-1], C[i-1, j], C[i, j-1]), C[0, 0] = 0; the path
          back from C[N, M] gives each token the first position t where it is reached
Words:    a word (tokens from one leading space to the next, punctuation its own) spans from
          its first token's jump time to the next word's, t x 0.02 s; its probability is the
          mean of its tokens' p(y_n); punctuation then joins its neighbour
Then the same corrections as whisper: words at a sentence end no longer than twice the median
word duration (itself at most 0.7 s), and a segment's start and end moved to its words'.
Last, a step whisper lacks (stable-ts' "suppress silence"): a boundary that DTW left in
silence (a frame whose peak is under 1% of the recording's, -40 dB) moves onto the speech
inside its word, so a window's first word no longer starts at the window's start.
"""

from __future__ import annotations

import math
import string

import numpy as np
import torch

from ..core.attention import recorded_attention

PREPEND = "\"'“¿([{-"
APPEND = "\"'.。,，!！?？:：”)]}、"
SENTENCE_END = ".。!！?？"
NO_SPACES = ("zh", "ja", "th", "lo", "my", "yue")  # words split on characters, not spaces


def median_filter(x: torch.Tensor, width: int) -> torch.Tensor:
    """The median of each `width` neighbours along the last dim, reflect-padded at the ends."""
    pad = width // 2
    if x.size(-1) <= pad:
        return x
    shape = x.shape
    x = torch.nn.functional.pad(x.reshape(-1, 1, shape[-1]), (pad, pad), mode="reflect")
    return x.unfold(-1, width, 1).sort()[0][..., pad].reshape(shape)


def dtw(cost: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The cheapest monotone path through `cost` (N, M) from (0, 0) to (N-1, M-1), steps
    (1, 1), (1, 0), (0, 1): C[i, j] = cost[i-1, j-1] + min(C[i-1, j-1], C[i-1, j], C[i, j-1]),
    ties to the later step as whisper's dtw_cpu. Cells on one anti-diagonal i + j = k depend
    only on the two before it, so each diagonal is one vector step. Returns (rows, columns)."""
    N, M = cost.shape
    C = np.full((N + 1, M + 1), np.inf, dtype=np.float32)
    trace = np.full((N + 1, M + 1), -1, dtype=np.int8)
    C[0, 0] = 0
    for k in range(2, N + M + 1):
        i = np.arange(max(1, k - M), min(N, k - 1) + 1)
        j = k - i
        c0, c1, c2 = C[i - 1, j - 1], C[i - 1, j], C[i, j - 1]
        t = np.where((c0 < c1) & (c0 < c2), 0, np.where((c1 < c0) & (c1 < c2), 1, 2))
        C[i, j] = cost[i - 1, j - 1] + np.choose(t, [c0, c1, c2])
        trace[i, j] = t
    trace[0, :], trace[:, 0] = 2, 1
    i, j, path = N, M, []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        step = trace[i, j]
        i, j = (i - 1, j - 1) if step == 0 else (i - 1, j) if step == 1 else (i, j - 1)
    rows, cols = np.array(path[::-1]).T
    return rows, cols


def cross_attention_scores(model, tokens: torch.Tensor, memory: torch.Tensor,
                           heads: list[tuple[int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (T, V), scores (len(heads), T, S) = q . k / sqrt(d) before the softmax) of the
    decoder over `tokens` (T,) and the encoder's output (1, S, d): the chosen heads' q and k
    as the trunk's attention() was called with them (block i's cross-attention is call 2i+1,
    after its self-attention), the fast path left as it is."""
    with recorded_attention() as calls:
        logits = model.logits(tokens[None], memory)[0]
    scores = []
    for layer, head in heads:
        q, k = calls[2 * layer + 1][:2]  # (1, H, T, d), (1, Hkv, S, d)
        k = k[0, head // (q.size(1) // k.size(1))]  # the K head serving q head `head`
        scores.append(q[0, head] @ k.T / math.sqrt(q.size(-1)))
    return logits, torch.stack(scores)


def split_words(tokenizer, tokens: list[int], spaces: bool = True
                ) -> tuple[list[str], list[list[int]]]:
    """Words and their tokens: tokens that decode to whole characters first (a character may
    take several byte tokens), then, with `spaces`, those joined up to the next one that starts
    with a space or is punctuation (whisper's split_tokens_on_spaces)."""
    full, words, groups, current, offset = tokenizer.decode(tokens), [], [], [], 0
    for token in tokens:
        current.append(token)
        text = tokenizer.decode(current)
        if "\ufffd" not in text or full[offset + text.index("\ufffd")] == "\ufffd":
            words.append(text)
            groups.append(current)
            current, offset = [], offset + len(text)
    if not spaces:
        return words, groups
    out_words, out_groups = [], []
    for word, group in zip(words, groups):
        if not out_words or word.startswith(" ") or word.strip() in string.punctuation:
            out_words.append(word)
            out_groups.append(list(group))
        else:
            out_words[-1] += word
            out_groups[-1] += group
    return out_words, out_groups


def find_alignment(model, tokenizer, prompt: list[int], text: list[int], memory: torch.Tensor,
                   frames: int, heads, eos: int, *, spaces: bool = True,
                   medfilt_width: int = 7) -> list[dict]:
    """[{"word", "tokens", "start", "end", "probability"}] of `text` (token ids) in a window of
    `frames` log-mel frames whose encoder output is `memory`, times from the window's start;
    `prompt` is the start sequence ending in <|notimestamps|>."""
    if not text:
        return []
    tokens = torch.tensor(prompt + text + [eos], device=memory.device)
    with torch.no_grad():
        logits, scores = cross_attention_scores(model, tokens, memory, heads)
    n0 = len(prompt) - 1  # the start sequence without <|notimestamps|>
    probs = logits[n0:n0 + len(text), :eos].float().softmax(-1)
    token_probs = probs[torch.arange(len(text)), torch.tensor(text)].tolist()
    weights = scores[:, :, :frames // 2].softmax(-1)
    std, mean = torch.std_mean(weights, dim=-2, keepdim=True, unbiased=False)
    weights = median_filter((weights - mean) / std, medfilt_width)
    matrix = weights.mean(0)[n0:-1]  # rows: <|notimestamps|> and the text tokens
    rows, cols = dtw(-matrix.double().cpu().numpy())
    words, groups = split_words(tokenizer, text, spaces)
    bounds = np.pad(np.cumsum([len(g) for g in groups]), (1, 0))
    jumps = np.pad(np.diff(rows), (1, 0), constant_values=1).astype(bool)
    times = cols[jumps] * 0.02
    return [{"word": w, "tokens": g, "start": float(times[a]), "end": float(times[b]),
             "probability": float(np.mean(token_probs[a:b]))}
            for w, g, a, b in zip(words, groups, bounds[:-1], bounds[1:])]


def merge_punctuations(alignment: list[dict], prepended: str = PREPEND,
                       appended: str = APPEND) -> None:
    """Opening punctuation (a word of its own after a space) joins the word after it; closing
    punctuation joins the word before it; the emptied words stay, with no text."""
    i, j = len(alignment) - 2, len(alignment) - 1
    while i >= 0:
        prev, nxt = alignment[i], alignment[j]
        if prev["word"].startswith(" ") and prev["word"].strip() in prepended:
            nxt["word"], nxt["tokens"] = prev["word"] + nxt["word"], prev["tokens"] + nxt["tokens"]
            prev["word"], prev["tokens"] = "", []
        else:
            j = i
        i -= 1
    i, j = 0, 1
    while j < len(alignment):
        prev, nxt = alignment[i], alignment[j]
        if not prev["word"].endswith(" ") and nxt["word"] in appended:
            prev["word"] += nxt["word"]
            prev["tokens"] = prev["tokens"] + nxt["tokens"]
            nxt["word"], nxt["tokens"] = "", []
        else:
            i = j
        j += 1


def add_word_timestamps(segments: list[dict], alignment: list[dict], offset: float,
                        last_speech: float) -> float:
    """Give each segment (its text tokens in "text_tokens") its "words", times offset by the
    window's start, with whisper's corrections; returns the last word's end (or last_speech)."""
    durations = np.array([w["end"] - w["start"] for w in alignment])
    durations = durations[durations.nonzero()]
    median = min(0.7, float(np.median(durations))) if len(durations) else 0.0
    longest = 2 * median
    if len(durations):  # words at sentence boundaries at most twice the median duration
        for i in range(1, len(alignment)):
            if alignment[i]["end"] - alignment[i]["start"] > longest:
                if alignment[i]["word"] in SENTENCE_END:
                    alignment[i]["end"] = alignment[i]["start"] + longest
                elif alignment[i - 1]["word"] in SENTENCE_END:
                    alignment[i]["start"] = alignment[i]["end"] - longest
    merge_punctuations(alignment)
    index = 0
    for segment in segments:
        saved, words = 0, []
        while index < len(alignment) and saved < len(segment["text_tokens"]):
            w = alignment[index]
            if w["word"]:
                words.append({"word": w["word"].strip(), "start": round(offset + w["start"], 2),
                              "end": round(offset + w["end"], 2),
                              "probability": round(w["probability"], 4)})
            saved += len(w["tokens"])
            index += 1
        if words:
            first, last = words[0], words[-1]
            # after a pause, the first (and second) word at most twice the median duration
            if first["end"] - last_speech > 4 * median and (
                    first["end"] - first["start"] > longest
                    or (len(words) > 1 and words[1]["end"] - first["start"] > 2 * longest)):
                if len(words) > 1 and words[1]["end"] - words[1]["start"] > longest:
                    boundary = max(words[1]["end"] / 2, words[1]["end"] - longest)
                    first["end"] = words[1]["start"] = boundary
                first["start"] = max(0, first["end"] - longest)
            if segment["start"] < first["end"] and segment["start"] - 0.5 > first["start"]:
                first["start"] = max(0, min(first["end"] - median, segment["start"]))
            else:
                segment["start"] = first["start"]
            if segment["end"] > last["start"] and segment["end"] + 0.5 < last["end"]:
                last["end"] = max(last["start"] + median, segment["end"])
            else:
                segment["end"] = last["end"]
            last_speech = segment["end"]
        segment["words"] = words
    return last_speech


def voiced_frames(wave: torch.Tensor, rate: int, step: float = 0.02,
                  floor_db: float = -40.0) -> np.ndarray:
    """v[f] = max |x| over frame f (`step` seconds) > max |x| x 10^(floor_db / 20): which
    frames hold sound. A recording whose noise floor is above that has no silent frame, so
    nothing is moved."""
    size = round(step * rate)
    x = wave.abs().float()
    x = torch.nn.functional.pad(x, (0, -len(x) % size)).view(-1, size).amax(-1)
    return (x > x.max() * 10 ** (floor_db / 20)).numpy()


def snap_to_speech(segments: list[dict], voiced: np.ndarray, hop_seconds: float,
                   step: float = 0.02, pause: float = 0.2) -> None:
    """Move each word's start that lies in a silent frame to its first voiced frame, and its
    end to just after its last (a word with no voiced frame stays). A window's first word,
    which DTW pins to the window's first frame, starts after the last pause of `pause` seconds
    or more inside it: the speech before that pause is the previous window's last word. A
    segment whose start or end was its words' follows them; hop_seconds times a "seek"."""
    for segment in segments:
        words = segment.get("words")
        if not words:
            continue
        start, end = words[0]["start"], words[-1]["end"]
        window = round(segment["seek"] * hop_seconds / step)
        for w in words:
            a, b = round(w["start"] / step), round(w["end"] / step)
            if a == window:
                quiet = np.flatnonzero(~voiced[a:b])
                runs = np.split(quiet, np.flatnonzero(np.diff(quiet) > 1) + 1) if len(quiet) \
                    else []
                long = [r for r in runs if len(r) * step >= pause]
                if long:
                    a = a + long[-1][-1] + 1
            inside = np.flatnonzero(voiced[a:b])
            if len(inside):
                if not voiced[a] or a != round(w["start"] / step):
                    w["start"] = round((a + inside[0]) * step, 2)
                if not voiced[b - 1]:
                    w["end"] = round((a + inside[-1] + 1) * step, 2)
        if segment["start"] == start:
            segment["start"] = words[0]["start"]
        if segment["end"] == end:
            segment["end"] = words[-1]["end"]
