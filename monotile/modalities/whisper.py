"""Whisper (Radford et al. 2022): speech to text by an encoder-decoder on the trunk.

Features: Whisper's log-mel frames (audio.py) of each 30-s window of the audio, padded with
          silence to N = 2 source_positions frames (3000 at a 10-ms hop)
Encoder:  H = Norm(Blocks(GELU(conv_s2(GELU(conv(X)))) + P)), bidirectional, with the fixed
          sinusoids P[t, i] = sin(t / 10000^(i / (d/2 - 1))), P[t, d/2 + i] = cos(...)
Decoder:  logits_t = Norm(Blocks(E[y_t] + P_t)) E^T: each block attends causally to the tokens,
          then to H (cross-attention: q from the tokens, k and v from H), then its MLP
Prompt:   <|startoftranscript|> <|en|> <|transcribe|> [<|notimestamps|>] ... <|endoftext|>
Decoding: greedy, beam, timestamp rules and long recordings in whisper_decode.py; word
          timestamps in whisper_timing.py
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
from .audio import Subsampler, log_mel, mel_filters
from .base import register
from .speech_io import MAX_BEAM, Transcriber, format_scores, score_recordings
from .whisper_decode import temperatures, transcribe
from .whisper_timing import NO_SPACES


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
    alignment_heads: tuple = ()   # (decoder layer, head) pairs whose cross-attention aligns
                                  #   words to time (generation_config's alignment_heads)
    languages: tuple = ()         # (code, token id) pairs ("de", 50261); () for English-only
    pad: str = "audio"            # a short window filled to 30 s with: audio (silence before the
                                  #   log-mel: OpenAI, transformers) | features (zero log-mel
                                  #   frames after it: faster-whisper, set by `import ct2`)
    beam_search: str = "transformers"  # transformers (generate(num_beams)) | whisper (OpenAI's
                                  #   and faster-whisper's: done once W hypotheses end)

    def __post_init__(self):
        for name in ("suppress", "begin_suppress"):
            object.__setattr__(self, name, tuple(int(t) for t in getattr(self, name)))
        object.__setattr__(self, "alignment_heads",  # JSON gives lists back: pairs of ints
                           tuple((int(layer), int(head)) for layer, head in self.alignment_heads))
        object.__setattr__(self, "languages",
                           tuple((str(code), int(i)) for code, i in self.languages))
        check_positive(self, ("sample_rate", "n_fft", "hop", "n_mels", "source_positions",
                              "encoder_layers", "encoder_heads", "encoder_ffn", "beam_width",
                              "max_new_tokens"))
        if self.decode not in ("greedy", "beam"):
            invalid(self, "decode", "choose greedy or beam")
        if self.pad not in ("audio", "features"):
            invalid(self, "pad", "choose audio or features")
        if self.beam_search not in ("transformers", "whisper"):
            invalid(self, "beam_search", "choose transformers or whisper")
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

    @property
    def inference_rows(self) -> dict[str, int]:
        """The encoder and the cross-attention's keys and values read a window's frames (1500
        for 30 s); the rest of the decoder reads a token per hypothesis."""
        frames = self.config.source_positions
        return {"encoder.*": frames, "*.cross_attn.kv": frames, "*": 1}

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
                        "of its own; score it on yours with `monotile eval RUN --data "
                        "MANIFEST.csv` (lines of path,transcript)")

    def report(self, model, run_dir: Path, *, data: str | None = None,
               progress: bool = False) -> dict:
        """WER and CER of the transcripts of `data`'s recordings after normalize_english, per
        file too, and the real-time factor (speech_io.score_recordings)."""
        if data is None:
            return self.evaluate(model, progress)
        return score_recordings(self, model, data, progress=progress)

    def format_report(self, figures: dict) -> str:
        return format_scores(figures)

    @property
    def language(self) -> str:
        """The code of the prompt's default <|xx|> token among the checkpoint's languages
        ("en" for an English-only one, which has none)."""
        c = self.config
        return next((code for code, i in c.languages if i == c.language_id), "en")

    # ---- features and decoding ----------------------------------------------------------------
    def features(self, wave: torch.Tensor) -> torch.Tensor:
        """(N,) samples of one window -> (n_mels, 2 S) log-mel frames, padded with silence (or
        cut) to the window, as transformers' WhisperFeatureExtractor computes them; with
        pad="features", the log-mel of the samples alone (one hop of silence after them) and
        zero frames after it, as faster-whisper computes them."""
        c = self.config
        n = c.frames * c.hop
        if c.pad == "features":
            frames = min(len(wave), n) // c.hop
            mel = log_mel(F.pad(wave[:n], (0, c.hop)), self.filters, c.n_fft, c.hop)
            return F.pad(mel[:, :frames], (0, c.frames - frames))
        wave = F.pad(wave, (0, max(0, n - len(wave))))[:n]
        return log_mel(wave, self.filters, c.n_fft, c.hop)

    def text(self, ids: list[int]) -> str:
        return self.tokenizer.decode([i for i in ids if i < self.config.eos_id]).strip()

    def special(self, *names: str) -> int | None:
        """The id of the first of `names` the tokenizer knows (<|nospeech|> is <|nocaptions|>
        in the English-only checkpoints), or None."""
        ids = (self.tokenizer.tok.token_to_id(n) for n in names)
        return next((i for i in ids if i is not None), None)

    def start_sequence(self, language: str | None, task: str | None,
                       timestamps: bool) -> list[int]:
        """<|startoftranscript|> <|xx|> <|transcribe|> or <|translate|> [<|notimestamps|>]:
        the language code looked up in the checkpoint's `languages`."""
        c = self.config
        if task not in (None, "transcribe", "translate"):
            raise ConfigError(f"--task {task} is invalid: choose transcribe or translate")
        english_only = not c.languages and c.language_id is None
        if english_only and ((language or "en").lower() not in ("en", "english")
                             or task == "translate"):
            flag = f"--language {language}" if language else "--task translate"
            raise ConfigError(f"{flag} is refused: this checkpoint is English-only (it has no "
                              "language or task tokens); leave it out, or import a "
                              "multilingual checkpoint")
        ids = c.prompt(timestamps)
        if english_only:
            return ids
        if language is not None:
            codes = dict(c.languages)
            key = language.lower().strip("<|>")
            if key not in codes:
                known = ", ".join(sorted(codes)[:12]) or "none listed; re-import the run"
                raise ConfigError(f"--language {language} is not one of this checkpoint's "
                                  f"{len(codes)} languages; give a code such as {known}")
            ids[1] = codes[key]
        if task is not None:
            token = self.special(f"<|{task}|>")
            if token is None:
                raise ConfigError(f"--task {task} is unavailable: the checkpoint's tokenizer has "
                                  f"no <|{task}|> token")
            ids[2] = token
        return ids

    # ---- using the model ----------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, model, items: list[torch.Tensor], *, method: str | None = None,
                beam_width: int | None = None, timestamps: bool | None = None,
                words: list[str] | None = None, language: str | None = None,
                task: str | None = None, word_timestamps: bool = False,
                snap_to_speech: bool = True, condition_on_previous_text: bool = True,
                temperature: float = 0.0, fallback: bool = True, best_of: int = 5,
                progress: bool = False) -> list[dict]:
        """The transcript of each waveform as whisper's transcribe() makes it
        (whisper_decode.transcribe): {"text", "duration", "segments": [{"seek", "start", "end",
        "text", "temperature", "avg_logprob", "compression_ratio", "no_speech_prob"}]}, each
        segment with "words": [{"word", "start", "end", "probability"}] when word_timestamps
        (a word's start or end that lies in silence moved onto its speech unless
        snap_to_speech=False, which leaves whisper's times as they are).
        `language` (a code such as "de") and `task` (transcribe or translate) choose the prompt
        of a multilingual checkpoint; `temperature` is the first one tried, then +0.2 up to 1.0
        while a window fails (fallback=True); at a temperature above 0, `best_of` samples are
        drawn and the likeliest per token kept (whisper's and faster-whisper's default 5)."""
        c = self.config
        if words:
            raise ConfigError("--words (a closed vocabulary) is for CTC speech runs; a Whisper "
                              "run spells freely, leave it out")
        if beam_width is not None and not 0 < beam_width <= MAX_BEAM:
            raise ConfigError(f"--beam {beam_width} is invalid: give a beam width from 1 to "
                              f"{MAX_BEAM}")
        if not 0 < best_of <= MAX_BEAM:
            raise ConfigError(f"best_of={best_of} is invalid: give a number of samples from 1 "
                              f"to {MAX_BEAM}")
        if not 0 <= temperature <= 2:
            raise ConfigError(f"--temperature {temperature} is invalid: give one from 0 to 2")
        timestamps = c.timestamps if timestamps is None else timestamps
        if timestamps and c.no_timestamps_id is None:
            raise ConfigError("timestamps are not available: the checkpoint has no "
                              "<|notimestamps|> token")
        method = method or ("beam" if beam_width else c.decode)
        n_layer, n_head = model.decoder.cfg.n_layer, model.decoder.cfg.n_head
        code = (language or self.language).lower().strip("<|>")
        how = {"method": method, "beam_width": beam_width or c.beam_width,
               "timestamps": timestamps, "word_timestamps": word_timestamps,
               "snap_to_speech": snap_to_speech,
               "condition": condition_on_previous_text,
               "start": self.start_sequence(language, task, timestamps),
               "align_prompt": self.start_sequence(language, task, False),
               "temperatures": temperatures(temperature, fallback), "best_of": best_of,
               "no_speech_id": self.special("<|nospeech|>", "<|nocaptions|>"),
               # without alignment heads in the checkpoint: every head of the upper half
               "heads": list(c.alignment_heads) or [(i, h) for i in range(n_layer // 2, n_layer)
                                                    for h in range(n_head)],
               "spaces": code not in NO_SPACES}
        out = []
        for wave in tqdm(items, disable=not progress or len(items) < 2, desc="transcribe",
                         unit="file"):
            seconds = round((len(wave) // c.hop) * c.hop / c.sample_rate, 2)
            with tqdm(total=seconds, unit="s", desc="audio", leave=len(items) < 2,
                      disable=not progress, bar_format="{l_bar}{bar}| {n:.1f}/{total:.1f} s "
                      "[{elapsed}<{remaining}]") as bar:
                out.append({**transcribe(self, model, wave, how, bar), "language": code,
                            "task": task or "transcribe"})
        return out
