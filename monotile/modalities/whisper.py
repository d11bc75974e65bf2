"""Whisper (Radford et al. 2022): speech to text by an encoder-decoder on the trunk.

Features: Whisper's log-mel frames (audio.py) of each 30-s window of the audio, padded with
          silence to N = 2 source_positions frames (3000 at a 10-ms hop)
Encoder:  H = Norm(Blocks(GELU(conv_s2(GELU(conv(X)))) + P)), bidirectional, with the fixed
          sinusoids P[t, i] = sin(t / 10000^(i / (d/2 - 1))), P[t, d/2 + i] = cos(...)
Decoder:  logits_t = Norm(Blocks(E[y_t] + P_t)) E^T: each block attends causally to the tokens,
          then to H (cross-attention: q from the tokens, k and v from H), then its MLP
Prompt:   <|startoftranscript|> <|en|> <|transcribe|> [<|notimestamps|>] ... <|endoftext|>
Greedy:   y_t = argmax_v s_t(v); beam search keeps the W best prefixes by sum_t log p(y_t) of the
          W x V continuations, a finished one scored sum_t log p(y_t) / its length (transformers')
Rules:    s_t = log p_t with suppressed tokens at -inf; with timestamps (OpenAI's rules) they come
          in pairs and never decrease, the first token is one <= max_initial_timestamp, and when
          log sum_ts p > max_text log p a timestamp is forced
Segments: <|t0|> text <|t1|> is the segment [t0, t1] of its window; t = index x 0.02 s
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.transformer import ModelConfig, Transformer, init_weights
from ..errors import ConfigError, DataError, check_positive, invalid
from ..tokenizers import Tokenizer
from .audio import Subsampler, log_mel, mel_filters, silent
from .base import register
from .speech_io import MAX_BEAM, Transcriber


@dataclass(frozen=True, kw_only=True)
class TranscribeConfig:
    """A Whisper checkpoint's features, encoder and decoding settings (the decoder is the run's
    `model` section); filled by `monotile import hf` from config.json, generation_config.json,
    preprocessor_config.json and the tokenizer's special tokens."""

    sample_rate: int = 16000
    n_fft: int = 400
    hop: int = 160
    n_mels: int = 80
    source_positions: int = 1500  # encoder tokens per window, 2 frames each: 30 s at a 10-ms hop
    encoder_layers: int = 4
    encoder_heads: int = 6
    encoder_ffn: int = 1536
    start_id: int = 50258         # <|startoftranscript|>
    language_id: int | None = 50259  # <|en|>; None for English-only models
    task_id: int | None = 50359   # <|transcribe|>; None for English-only models
    no_timestamps_id: int | None = 50363  # <|notimestamps|>; the timestamps follow it
    eos_id: int = 50257           # <|endoftext|>; text tokens are the ids below it
    suppress: tuple = ()          # never generated (generation_config's suppress_tokens)
    begin_suppress: tuple = ()    # not generated first (begin_suppress_tokens)
    max_initial_timestamp: int | None = None  # the first timestamp's highest index, if any
    timestamps: bool = True       # decode with timestamp tokens: segments with their times
    decode: str = "greedy"        # greedy | beam
    beam_width: int = 5
    max_new_tokens: int = 224     # per window (OpenAI's: half the decoder's context)

    def __post_init__(self):
        for name in ("suppress", "begin_suppress"):
            object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
        check_positive(self, ("sample_rate", "n_fft", "hop", "n_mels", "source_positions",
                              "encoder_layers", "encoder_heads", "encoder_ffn", "beam_width",
                              "max_new_tokens"))
        if self.decode not in ("greedy", "beam"):
            invalid(self, "decode", "choose greedy or beam")
        if self.timestamps and self.no_timestamps_id is None:
            invalid(self, "timestamps", "the checkpoint has no <|notimestamps|> token, so no "
                    "timestamps; set timestamps=false")

    @property
    def frames(self) -> int:
        """Log-mel frames per window: the encoder's stride-2 stem halves them."""
        return 2 * self.source_positions

    @property
    def window_seconds(self) -> float:
        return self.frames * self.hop / self.sample_rate

    @property
    def time_step(self) -> float:
        """Seconds per timestamp token (0.02 s: one encoder position)."""
        return 2 * self.hop / self.sample_rate

    def prompt(self, timestamps: bool) -> list[int]:
        ids = [self.start_id, self.language_id, self.task_id]
        if not timestamps:
            ids.append(self.no_timestamps_id)
        return [i for i in ids if i is not None]

    def encoder_config(self, decoder: ModelConfig) -> ModelConfig:
        return decoder.replace(vocab_size=0, n_layer=self.encoder_layers,
                               n_head=self.encoder_heads, d_ff=self.encoder_ffn,
                               context=self.source_positions, cross_attention=False)


# ---- the model ----------------------------------------------------------------------------

def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """(length, channels) Whisper positions: sin(t / s^(i / (c/2 - 1))) then the cosines."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]
    return torch.cat([scaled.sin(), scaled.cos()], dim=1)


class WhisperModel(nn.Module):
    """Log-mel (B, n_mels, 2 S) -> stem -> bidirectional encoder (B, S, d) = memory; tokens
    (B, T) -> embedding -> causal decoder cross-attending to the memory -> tied head."""

    def __init__(self, decoder: ModelConfig, encoder: ModelConfig, n_mels: int):
        super().__init__()
        if not decoder.cross_attention:
            raise ConfigError("cross_attention=false is invalid for a Whisper decoder: its "
                              "blocks attend to the encoder's output; set it to true")
        self.stem = Subsampler(n_mels, encoder.d_model, 2)  # Whisper's two convolutions
        self.encoder = Transformer(encoder)
        self.tok_emb = nn.Embedding(decoder.vocab_size, decoder.d_model)
        self.decoder = Transformer(decoder)
        self.head = nn.Linear(decoder.d_model, decoder.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # Whisper's output projection is the embedding

    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        """(B, n_mels, 2 S) log-mel frames -> (B, S, d) encoder output."""
        return self.encoder(self.stem(mel.transpose(1, 2)), causal=False)

    def logits(self, tokens, memory=None, *, cache=None, cross_cache=None, pos: int = 0):
        """(B, T) tokens -> (B, T, vocab). `memory` is the encoder output; when decoding step by
        step it is given once, with `cross_cache`, and later steps read its keys from there."""
        h = self.decoder(self.tok_emb(tokens), causal=True, memory=memory, cache=cache,
                         cross_cache=cross_cache, pos=pos)
        return self.head(h)

    def forward(self, mel: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        return self.logits(tokens, self.encode(mel))


# ---- decoding -----------------------------------------------------------------------------

class TokenRules:
    """The filters of Whisper's decoding on scores (N, V), one row per hypothesis, in
    transformers' order: begin_suppress at the first step, suppress always, then (with
    timestamps) OpenAI's timestamp rules."""

    def __init__(self, cfg: TranscribeConfig, timestamps: bool):
        self.cfg, self.timestamps = cfg, timestamps
        self.ts = None if cfg.no_timestamps_id is None else cfg.no_timestamps_id + 1

    def __call__(self, scores: torch.Tensor, generated: list[list[int]]) -> torch.Tensor:
        c, scores = self.cfg, scores.clone()
        first = len(generated[0]) == 0
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


def _caches(model: WhisperModel, batch: int, length: int, memory_len: int):
    return (model.decoder.make_cache(batch, length),
            model.decoder.make_cross_cache(batch, memory_len))


@torch.no_grad()
def greedy_decode(model: WhisperModel, memory: torch.Tensor, prompt: list[int],
                  rules: TokenRules, max_new_tokens: int, eos: int) -> list[int]:
    """Tokens after the prompt, argmax at each step, until <|endoftext|> (not returned)."""
    cache, cross = _caches(model, 1, len(prompt) + max_new_tokens, memory.size(1))
    x = torch.tensor([prompt], device=memory.device)
    logits = model.logits(x, memory, cache=cache, cross_cache=cross)[:, -1]
    out: list[int] = []
    for step in range(max_new_tokens):
        token = int(rules(logits.float(), [out]).argmax(-1))
        if token == eos:
            break
        out.append(token)
        if step + 1 < max_new_tokens:
            x = torch.tensor([[token]], device=memory.device)
            logits = model.logits(x, cache=cache, cross_cache=cross, pos=len(prompt) + step)[:, -1]
    return out


@torch.no_grad()
def beam_decode(model: WhisperModel, memory: torch.Tensor, prompt: list[int],
                rules: TokenRules, max_new_tokens: int, eos: int, width: int,
                length_penalty: float = 1.0) -> list[int]:
    """Beam search as transformers' generate(num_beams=width) runs it: each step the 2 W best
    continuations by summed log-probability; one ending in <|endoftext|> among the first W (or
    any of the first W at the last step) is finished, scored sum log p / generated length; the
    best W others continue. Stops when no running beam can beat the W finished ones."""
    P, W = len(prompt), width
    cache, cross = _caches(model, W, P + max_new_tokens, memory.size(1))
    x = torch.tensor([prompt] * W, device=memory.device)
    logits = model.logits(x, memory.expand(W, -1, -1), cache=cache, cross_cache=cross)[:, -1]
    beams: list[list[int]] = [[] for _ in range(W)]
    scores = torch.full((W,), -1e9)
    scores[0] = 0.0  # W copies of the prompt: only the first one expands at the first step
    finished: list[tuple[float, list[int]]] = []
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
                    finished.append((s / (step + 1) ** length_penalty, beams[b] + [token]))
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
    best = max(finished, key=lambda f: f[0])[1] if finished else beams[0]
    return best[:-1] if best and best[-1] == eos else best


# ---- the task -----------------------------------------------------------------------------

@register
class TranscribeTask(Transcriber):
    """Speech to text with an imported Whisper checkpoint: `monotile predict RUN a.wav`. Not
    trained here (no batches or loss): runs come from `monotile import hf`."""

    name = "transcribe"
    Config = TranscribeConfig
    best_metric = ("wer", "min")
    origin = ("import a Whisper checkpoint with `monotile import hf DIR`, or train a CTC "
              "recogniser with `monotile train speech`")

    def __init__(self, config: TranscribeConfig, tokenizer: Tokenizer | None = None):
        self.config, self.tokenizer = config, tokenizer
        self.filters = mel_filters(config.sample_rate, config.n_fft, config.n_mels)

    @classmethod
    def load(cls, config: TranscribeConfig, model_cfg: ModelConfig, run_dir: Path):
        return cls(config, Tokenizer.load(Path(run_dir) / "tokenizer.json"))

    def build_model(self, cfg: ModelConfig) -> WhisperModel:
        c = self.config
        model = WhisperModel(cfg, c.encoder_config(cfg), c.n_mels)
        init_weights(model, cfg.n_layer)
        with torch.no_grad():
            model.encoder.pos_emb.copy_(sinusoids(c.source_positions, cfg.d_model))
        model.encoder.pos_emb.requires_grad_(False)  # fixed, as in Whisper
        return model

    def evaluate(self, model, progress: bool = False):
        raise DataError("this run was imported from a Whisper checkpoint and has no test data "
                        "of its own; transcribe files with `monotile predict RUN FILE.wav`")

    # ---- features and decoding ----------------------------------------------------------------
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(N,) samples of one window -> (n_mels, 2 S) log-mel frames, padded with silence (or
        cut) to the window, as transformers' WhisperFeatureExtractor computes them."""
        n = self.config.frames * self.config.hop
        wave = F.pad(wave, (0, max(0, n - len(wave))))[:n]
        return log_mel(wave, self.filters, self.config.n_fft, self.config.hop)

    def decode_window(self, model: WhisperModel, wave: torch.Tensor, *, method: str,
                      beam_width: int, timestamps: bool) -> list[int]:
        """Token ids (prompt and <|endoftext|> left out) of one window's transcript."""
        c = self.config
        device = next(model.parameters()).device
        memory = model.encode(self.features(wave)[None].to(device))
        prompt = c.prompt(timestamps)
        budget = min(c.max_new_tokens, model.decoder.cfg.context - len(prompt))
        rules = TokenRules(c, timestamps)
        if method == "beam":
            return beam_decode(model, memory, prompt, rules, budget, c.eos_id, beam_width)
        return greedy_decode(model, memory, prompt, rules, budget, c.eos_id)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i < self.config.eos_id]).strip()

    def segments(self, ids: list[int], start: float, end: float, timestamps: bool) -> list[dict]:
        """Segments {"start", "end", "text"} of one window's tokens: each <|t0|> text <|t1|>
        is one, offset by the window's start and kept within its audio; text without a closing
        timestamp ends with the window; without timestamps the window is one segment."""
        if not timestamps:
            text = self.text(ids)
            return [{"start": round(start, 3), "end": round(end, 3), "text": text}] if text else []
        ts, step, span = self.config.no_timestamps_id + 1, self.config.time_step, end - start
        out, opened, pending, last_end = [], None, [], 0.0
        for i in ids + [None]:
            if i is not None and i < ts:
                pending.append(i)
                continue
            t = span if i is None else min((i - ts) * step, span)
            text = self.text(pending)
            if text:
                begin = opened if opened is not None else last_end
                out.append({"start": round(start + begin, 3),
                            "end": round(start + max(t, begin), 3), "text": text})
                last_end, opened = t, None
            else:
                opened = t
            pending = []
        return out

    # ---- using the model ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model, items: list[torch.Tensor], *, method: str | None = None,
                beam_width: int | None = None, timestamps: bool | None = None,
                words: list[str] | None = None, progress: bool = False) -> list[dict]:
        """The transcript of each waveform, window by window (30 s each), with the segments'
        times: {"text", "duration", "segments": [{"start", "end", "text"}]}."""
        c = self.config
        if words:
            raise ConfigError("--words (a closed vocabulary) is for CTC speech runs; a Whisper "
                              "run spells freely, leave it out")
        if beam_width is not None and not 0 < beam_width <= MAX_BEAM:
            raise ConfigError(f"--beam {beam_width} is invalid: give a beam width from 1 to "
                              f"{MAX_BEAM}")
        timestamps = c.timestamps if timestamps is None else timestamps
        if timestamps and c.no_timestamps_id is None:
            raise ConfigError("timestamps are not available: the checkpoint has no "
                              "<|notimestamps|> token")
        method = method or ("beam" if beam_width else c.decode)
        beam_width = beam_width or c.beam_width
        window = c.frames * c.hop
        out = []
        for wave in tqdm(items, disable=not progress or len(items) < 2, desc="transcribe",
                         unit="file"):
            duration = len(wave) / c.sample_rate
            segments = []
            for begin in range(0, len(wave), window):
                piece = wave[begin:begin + window]
                if silent(piece):
                    continue  # Whisper makes words up in silence
                ids = self.decode_window(model, piece, method=method, beam_width=beam_width,
                                         timestamps=timestamps)
                start = begin / c.sample_rate
                segments += self.segments(ids, start, min(start + c.window_seconds, duration),
                                          timestamps)
            out.append({"text": " ".join(s["text"] for s in segments),
                        "duration": round(duration, 3), "segments": segments})
        return out
