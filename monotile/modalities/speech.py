"""Speech: log-mel frames become tokens, the trunk runs bidirectionally, a CTC head spells.

Frames:    Whisper's log-mel frames L (audio.py), then per utterance
           x = (L - mean_(t,f) L) / std_(t,f) L   (normalize="gain"), or per mel bin f
           x = (L - mean_t L) / std_t L           (normalize="utterance", CMVN); a volume a
           shifts L by log10(a) / 2 and its floor with it, so x does not depend on the volume,
           down to the absolute floor of -100 dB
Tokens:    z = GELU(conv_s2(... GELU(conv_s2(GELU(conv(x)))))): 3-wide 1-D convolutions, each
           stride-2 one halving the frame rate (subsample = 2 or 4), as Whisper's encoder stem
Head:      p_t(c) = softmax(W z_L[t])_c over the blank and the characters of the transcripts
Loss:      CTC: -log sum over alignments pi that collapse to y of prod_t p_t(pi_t) (infer/ctc.py)
Augment:   speed perturbation (resampling by 1 +- speed), white noise at a random SNR,
           SpecAugment (Park et al. 2019): random frequency and time bands set to the mean
Metrics:   WER = word edit distance / reference words, CER the same over characters
"""


from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.transformer import ModelConfig, Transformer, init_weights
from ..data import find_data
from ..errors import ConfigError, DataError, check_positive, invalid
from ..infer.ctc import Lexicon, beam_search, ctc_loss, forced_align, greedy_decode
from .audio import Subsampler, log_mel, mel_filters, silent
from .base import register
from .metrics import confusion_matrix, error_rates, per_class_figures
from .speech_io import (BUILTIN, MAX_BEAM, Transcriber, Utterance, list_utterances,
                        normalize_text, read_all, split_utterances)



@dataclass(frozen=True, kw_only=True)
class SpeechConfig:
    data: str = "fsdd"            # fsdd | a manifest .csv/.tsv (path, transcript[, speaker])
                                  #   | a LibriSpeech-style folder of *.trans.txt
    sample_rate: int = 16000      # audio is resampled to this rate
    n_fft: int = 400              # STFT window (25 ms at 16 kHz)
    hop: int = 160                # frame step (10 ms at 16 kHz)
    n_mels: int = 80
    subsample: int = 2            # frames per token: 1, 2 or 4
    normalize: str = "gain"       # gain: mean 0, std 1 over the whole utterance | utterance:
                                  #   mean 0, std 1 per mel bin (CMVN) | none: Whisper's scale
    max_seconds: float = 30.0     # longer audio is transcribed in chunks of this length
    holdout_speaker: str = ""     # test on this speaker's recordings, train on the others'
    val_fraction: float = 0.1     # held out when the data has no test split
    split_seed: int = 0
    speed: float = 0.0            # augmentation: speed factor in [1 - speed, 1 + speed],
    noise: float = 0.0            #   white noise with this probability, at an SNR in
    noise_snr: tuple = (10.0, 40.0)  # this range (dB),
    filter_db: float = 0.0        #   FilterAugment: a random gain curve over the mel bins of
                                  #   up to +- this many dB (another microphone's colour)
    freq_masks: int = 0           #   SpecAugment: this many bands of up to freq_width mel bins
    freq_width: int = 0
    time_masks: int = 0           #   and of up to time_width frames (at most a fifth of it)
    time_width: int = 0
    ctc: str = "pytorch"          # the training loss's kernel: pytorch (F.ctc_loss) | reference
                                  #   (infer/ctc.py, the recursion written out; equal values)
    decode: str = "greedy"        # greedy | beam
    beam_width: int = 8
    closed_vocabulary: bool = False  # beam search spells only words of `words`
    eval_batch_size: int = 64
    alphabet: str = ""            # characters of the training transcripts, filled at train time
    words: tuple = ()             # distinct words of the training transcripts (filled; <= 1000)

    def __post_init__(self):
        object.__setattr__(self, "words", tuple(self.words))
        object.__setattr__(self, "noise_snr", tuple(float(v) for v in (
            self.noise_snr.split(",") if isinstance(self.noise_snr, str) else self.noise_snr)))

        check_positive(self, ("sample_rate", "n_fft", "hop", "n_mels", "eval_batch_size",
                              "beam_width"))
        if self.hop > self.n_fft:
            invalid(self, "hop", f"frames would skip samples; use hop <= n_fft={self.n_fft}")
        if self.subsample not in (1, 2, 4):
            invalid(self, "subsample", "choose 1, 2 or 4")
        if self.normalize not in ("utterance", "gain", "none"):
            invalid(self, "normalize", "choose utterance, gain or none")
        if self.ctc not in ("pytorch", "reference"):
            invalid(self, "ctc", "choose pytorch or reference")
        if self.decode not in ("greedy", "beam"):
            invalid(self, "decode", "choose greedy or beam")
        if not self.max_seconds > 0:
            invalid(self, "max_seconds", "it must be > 0")
        if not 0 < self.val_fraction < 1:
            invalid(self, "val_fraction", "it must be in (0, 1)")
        if not 0 <= self.speed < 0.5:
            invalid(self, "speed", "it must be in [0, 0.5)")
        if not 0 <= self.noise <= 1:
            invalid(self, "noise", "it is a probability, in [0, 1]")
        if not 0 <= self.filter_db <= 40:
            invalid(self, "filter_db", "give a gain range in dB, 0 to 40 (0: off)")
        if len(self.noise_snr) != 2 or self.noise_snr[0] > self.noise_snr[1]:
            invalid(self, "noise_snr", "give two numbers low,high in dB, e.g. 10,40")
        for name in ("freq_masks", "freq_width", "time_masks", "time_width"):
            if getattr(self, name) < 0:
                invalid(self, name, "it must be >= 0")

    @property
    def frame_seconds(self) -> float:
        """Seconds per output token: hop x subsample / rate."""
        return self.hop * self.subsample / self.sample_rate

    @property
    def max_tokens(self) -> int:
        frames = int(self.max_seconds * self.sample_rate) // self.hop
        return -(-frames // self.subsample)



# ---- the model ----------------------------------------------------------------------------

class SpeechRecognizer(nn.Module):
    """Log-mel frames -> convolutional subsampler -> bidirectional trunk -> CTC head."""

    def __init__(self, cfg: ModelConfig, *, n_mels: int, subsample: int, n_symbols: int):
        super().__init__()
        self.subsampler = Subsampler(n_mels, cfg.d_model, subsample)
        self.trunk = Transformer(cfg)
        self.head = nn.Linear(cfg.d_model, n_symbols)

    def forward(self, frames: torch.Tensor, lengths: torch.Tensor):
        """frames (B, T, n_mels), lengths (B,) valid frames -> (log-probabilities (B, T', K),
        valid tokens (B,)); padded frames must be 0."""
        x = self.subsampler(frames)
        n = self.subsampler.lengths(lengths).clamp(max=x.size(1))
        valid = torch.arange(x.size(1), device=x.device)[None, :] < n[:, None]
        x = self.trunk(x, causal=False, key_padding=None if bool(valid.all()) else valid)
        return self.head(x).float().log_softmax(dim=-1), n


# ---- the task -----------------------------------------------------------------------------

@register
class SpeechTask(Transcriber):
    """Speech recognition with CTC, scored by word and character error rates."""

    name = "speech"
    Config = SpeechConfig
    best_metric = ("wer", "min")
    variable_length = True

    @property
    def inference_rows(self) -> int:
        """A recording is its frames at once (up to the model's context)."""
        return self.config.max_tokens

    def __init__(self, config: SpeechConfig):
        self.config = config
        self.filters = mel_filters(config.sample_rate, config.n_fft, config.n_mels)
        self._listing: dict[str, list[Utterance]] | None = None
        self._data: dict[str, tuple[list[torch.Tensor], list[Utterance]]] = {}
        self.symbols = {c: i + 1 for i, c in enumerate(config.alphabet)}  # 0 is the blank

    # ---- setting up -------------------------------------------------------------------------
    @classmethod
    def prepare(cls, config: SpeechConfig, model_cfg: ModelConfig, data: str | None = None):
        """Read the recordings, fix the alphabet and word list from the training transcripts."""
        if data is not None:
            config = dataclasses.replace(config, data=str(find_data(config.data, data)))
        task = cls(config)
        texts = [u.text for u in task.split("train")[1]]
        task.split("test")  # a bad test file fails here, before the run directory exists
        alphabet = "".join(sorted(set("".join(texts))))
        if not alphabet:
            raise DataError("the training transcripts are empty; give recordings with text")
        words = sorted({w for t in texts for w in t.split()})
        config = dataclasses.replace(config, alphabet=alphabet,
                                     words=tuple(words) if len(words) <= 1000 else ())
        task.config, task.symbols = config, {c: i + 1 for i, c in enumerate(alphabet)}
        return task, _model_config(config, model_cfg)

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        c = self.config
        model = SpeechRecognizer(_model_config(c, cfg), n_mels=c.n_mels, subsample=c.subsample,
                                 n_symbols=len(c.alphabet) + 1)
        init_weights(model, cfg.n_layer, scaled_residuals=False)
        for layer in model.subsampler.modules():
            if isinstance(layer, nn.Conv1d):
                nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
        return model

    def split(self, name: str):
        """(waveforms, utterances) of "train" or "test", read when first asked for: evaluating
        a trained run reads only its test recordings."""
        if name not in self._data:
            if self._listing is None:
                self._listing = split_utterances(self.config, _data_path(self.config))
            self._data[name] = read_all(self._listing[name], self.config, name)
        return self._data[name]

    # ---- features ---------------------------------------------------------------------------
    def features(self, waves: list[torch.Tensor], rng: torch.Generator | None = None):
        """Waveforms -> (frames (B, T, n_mels) normalised, padding 0; valid frames (B,)).
        With rng: speed perturbation and noise on the waveform, SpecAugment on the frames."""
        c = self.config
        if rng is not None:
            waves = [self.perturb(w, rng) for w in waves]
        lengths = torch.tensor([len(w) // c.hop for w in waves])
        longest = max(1, max(len(w) for w in waves))
        batch = torch.stack([F.pad(w, (0, longest - len(w))) for w in waves])
        spec = log_mel(batch, self.filters, c.n_fft, c.hop).transpose(1, 2)  # (B, T, M)
        if spec.size(1) == 0:  # shorter than one hop: one empty frame, length 0
            spec = spec.new_zeros(len(waves), 1, c.n_mels)
        valid = (torch.arange(spec.size(1))[None, :] < lengths[:, None])[..., None]
        if rng is not None and c.filter_db:
            spec = spec + self.filter_augment(len(waves), rng)[:, None, :]
        if c.normalize in ("utterance", "gain"):
            # utterance: each mel bin its own mean and std; gain: one of each for the whole
            # utterance, which keeps the shape of its spectrum
            dims = 1 if c.normalize == "utterance" else (1, 2)
            n = lengths.clamp_min(1)[:, None, None] * (1 if dims == 1 else spec.size(2))
            mean = (spec * valid).sum(dims, keepdim=True) / n
            var = (((spec - mean) * valid) ** 2).sum(dims, keepdim=True) / n
            spec = (spec - mean) / var.sqrt().clamp_min(1e-3)
        spec = spec * valid
        if rng is not None:
            spec = self.spec_augment(spec, lengths, rng)
        return spec, lengths

    def perturb(self, wave: torch.Tensor, rng: torch.Generator) -> torch.Tensor:
        """Speed by a factor in [1 - speed, 1 + speed] (linear resampling: tempo and pitch
        together, as Kaldi's speed perturbation); white noise at a random SNR."""
        c = self.config
        if c.speed and len(wave) > 1:
            factor = 1 + (torch.rand((), generator=rng).item() * 2 - 1) * c.speed
            n = max(2, round(len(wave) / factor))
            wave = F.interpolate(wave[None, None], size=n, mode="linear",
                                 align_corners=True)[0, 0]
        if c.noise and torch.rand((), generator=rng).item() < c.noise:
            lo, hi = c.noise_snr
            snr = lo + torch.rand((), generator=rng).item() * (hi - lo)
            power = wave.pow(2).mean().clamp_min(1e-12)
            wave = wave + torch.randn(len(wave), generator=rng) * (power / 10 ** (snr / 10)).sqrt()
        return wave

    def filter_augment(self, n: int, rng: torch.Generator) -> torch.Tensor:
        """FilterAugment (Nam et al. 2022): per utterance, a gain curve over the mel bins that
        is linear between 3-6 random points with gains in [-filter_db, filter_db] dB, in
        log-mel units (Whisper's log10(power) / 4, so 1 dB = 1/40): another microphone."""
        c, M = self.config, self.config.n_mels
        out = torch.empty(n, M)
        for b in range(n):
            k = int(torch.randint(3, 7, (), generator=rng))
            points = torch.cat([torch.tensor([0.0, M - 1.0]),
                                torch.rand(k - 2, generator=rng) * (M - 1)]).sort().values
            gains = (torch.rand(k, generator=rng) * 2 - 1) * c.filter_db / 40
            out[b] = torch.from_numpy(np.interp(np.arange(M), points.numpy(), gains.numpy()))
        return out

    def spec_augment(self, spec: torch.Tensor, lengths: torch.Tensor, rng: torch.Generator):
        """SpecAugment's masks: freq_masks bands of f ~ U[0, freq_width] bins and time_masks
        bands of t ~ U[0, min(time_width, T/5)] frames per utterance, set to 0 (the mean)."""
        c = self.config
        B, T, M = spec.shape
        keep = torch.ones(B, T, M)
        for b in range(B):
            for _ in range(c.freq_masks):
                w = int(torch.randint(c.freq_width + 1, (), generator=rng))
                f0 = int(torch.randint(max(1, M - w + 1), (), generator=rng))
                keep[b, :, f0:f0 + w] = 0
            limit = min(c.time_width, int(lengths[b]) // 5)
            for _ in range(c.time_masks):
                w = int(torch.randint(limit + 1, (), generator=rng))
                t0 = int(torch.randint(max(1, int(lengths[b]) - w + 1), (), generator=rng))
                keep[b, t0:t0 + w] = 0
        return spec * keep

    def encode(self, text: str) -> list[int]:
        return [self.symbols[ch] for ch in text if ch in self.symbols]

    def spell(self, ids: list[int]) -> str:
        return " ".join("".join(self.config.alphabet[i - 1] for i in ids if i > 0).split())

    # ---- training -----------------------------------------------------------------------------
    def batches(self, split: str, rng: torch.Generator, batch_size: int) -> Iterator[dict]:
        """Recordings drawn uniformly with replacement (a run resumes exactly from the RNG
        state alone), perturbed and masked in training."""
        waves, items = self.split(split)
        targets = [torch.tensor(self.encode(u.text), dtype=torch.long) for u in items]
        while True:
            idx = torch.randint(len(waves), (batch_size,), generator=rng).tolist()
            frames, lengths = self.features([waves[i] for i in idx],
                                            rng if split == "train" else None)
            ys = [targets[i] for i in idx]
            yield {"frames": frames, "lengths": lengths,
                   "targets": nn.utils.rnn.pad_sequence(ys, batch_first=True) if ys else None,
                   "target_lengths": torch.tensor([len(y) for y in ys])}

    def loss(self, model, batch) -> torch.Tensor:
        log_probs, n = model(batch["frames"], batch["lengths"])
        if self.config.ctc == "reference":
            return ctc_loss(log_probs, batch["targets"], n, batch["target_lengths"],
                            zero_infinity=True)
        # PyTorch's kernel: the same loss and gradient (tests/test_ctc.py), ~4x faster at FSDD's
        # shapes on 2 cores, 1.3x on long utterances
        lp = log_probs.transpose(0, 1)
        return F.ctc_loss(lp if lp.dtype == torch.float64 else lp.float(), batch["targets"],
                          n.long(), batch["target_lengths"].long(), zero_infinity=True)

    def tokens(self, batch) -> int:
        return int((-(-batch["lengths"] // self.config.subsample)).sum())  # ceil(T / s)

    # ---- decoding -----------------------------------------------------------------------------
    @torch.no_grad()
    def log_probs(self, model, waves: list[torch.Tensor], progress: bool = False):
        """Per waveform: CTC log-probabilities (T', K) on the CPU, batched by length."""
        device = next(model.parameters()).device
        order = sorted(range(len(waves)), key=lambda i: len(waves[i]))
        out: list = [None] * len(waves)
        bs = self.config.eval_batch_size
        for s in tqdm(range(0, len(order), bs), disable=not progress, desc="decode",
                      unit="batch"):
            chunk = order[s:s + bs]
            frames, lengths = self.features([waves[i] for i in chunk])
            lp, n = model(frames.to(device), lengths.to(device))
            for j, i in enumerate(chunk):
                out[i] = lp[j, :int(n[j])].cpu()
        return out

    def lexicon(self, words: list[str] | tuple | None = None) -> Lexicon | None:
        words = self.config.words if words is None else words
        if not words:
            return None
        space = self.symbols.get(" ")
        return Lexicon([self.encode(w) for w in words if self.encode(w)], separator=space)

    def decode(self, lp: torch.Tensor, *, method: str | None = None, beam_width: int | None = None,
               lexicon: Lexicon | None = None) -> list[int]:
        """Token ids of one utterance's transcript: best path (greedy) or prefix beam search,
        optionally within a closed vocabulary."""
        method = method or self.config.decode
        if lp.size(0) == 0:
            return []
        if method == "greedy" and lexicon is None:
            return greedy_decode(lp)[0]
        hyps = beam_search(lp, beam_width=beam_width or self.config.beam_width, lexicon=lexicon)
        if hyps or lexicon is None or not lexicon.words:
            return hyps[0][0] if hyps else []
        # no whole word survived the beam: the most probable single word of the vocabulary
        n = torch.tensor([lp.size(0)])
        scores = [ctc_loss(lp[None], torch.tensor([w]), n, torch.tensor([len(w)]),
                           reduction="none").item() for w in lexicon.words]
        return lexicon.words[min(range(len(scores)), key=scores.__getitem__)]

    def _default_lexicon(self, lexicon):
        if lexicon is not None:
            return lexicon
        return self.lexicon() if self.config.closed_vocabulary else None

    # ---- metrics ------------------------------------------------------------------------------
    def evaluate(self, model, progress: bool = False) -> dict[str, float | int]:
        """WER, CER, the share of recordings transcribed exactly, and the CTC loss."""
        waves, items = self.split("test")
        return self._score(model, waves, items, progress)[0]

    def _score(self, model, waves, items, progress):
        lps = self.log_probs(model, waves, progress)
        lex = self._default_lexicon(None)
        hyps = ["" if silent(w) else self.spell(self.decode(lp, lexicon=lex))
                for lp, w in zip(lps, waves)]
        refs = [u.text for u in items]
        ys = [torch.tensor(self.encode(r), dtype=torch.long) for r in refs]
        loss = ctc_loss(nn.utils.rnn.pad_sequence(lps, batch_first=True),
                        nn.utils.rnn.pad_sequence(ys, batch_first=True),
                        torch.tensor([lp.size(0) for lp in lps]),
                        torch.tensor([len(y) for y in ys]), zero_infinity=True)
        figures = {**error_rates(refs, hyps),
                   "accuracy": sum(r == h for r, h in zip(refs, hyps)) / max(len(refs), 1),
                   "loss": loss.item(), "test_utterances": len(refs)}
        return figures, refs, hyps

    def report(self, model, run_dir: Path, *, data: str | None = None,
               progress: bool = False) -> dict:
        """evaluate() on the run's test split (or all recordings of `data`), plus, when every
        reference is one word of a closed vocabulary, per-word figures and plots/confusion.png."""
        if data is not None:
            path = Path(data).expanduser()
            if not path.exists():
                raise DataError(f"{path} does not exist; give a manifest or a folder of "
                                "recordings")
            items, test = list_utterances(self.config, path)
            waves, items = read_all(items + (test or []), self.config, "eval")
        else:
            waves, items = self.split("test")
        figures, refs, hyps = self._score(model, waves, items, progress)
        vocab = sorted(set(refs))
        if all(len(r.split()) == 1 for r in refs) and 1 < len(vocab) <= 50:
            from ..train.plots import plot_confusion
            order = [w for w in self.config.words if w in vocab] or vocab
            order += [w for w in vocab if w not in order]
            labels = order + ["(other)"]
            index = {w: i for i, w in enumerate(order)}
            y = torch.tensor([index[r] for r in refs])
            pred = torch.tensor([index.get(h, len(order)) for h in hyps])
            cm = confusion_matrix(y, pred, len(labels))
            figures.update(per_class_figures(cm, order))
            figures["confusion_png"] = str(plot_confusion(Path(run_dir), cm, labels,
                                                          unit="recordings"))
        return figures

    # ---- using the model --------------------------------------------------------------------
    def predict(self, model, items: list[torch.Tensor], *, method: str | None = None,
                beam_width: int | None = None, words: list[str] | None = None,
                progress: bool = False) -> list[dict]:
        """The transcript of each waveform, with per-word start and end times from the CTC
        alignment: {"text", "duration", "words": [{"word", "start", "end"}]}. Audio longer
        than max_seconds is transcribed in chunks. A beam width or a closed vocabulary of
        `words` means prefix beam search (unless method="greedy")."""
        c = self.config
        if beam_width is not None and not 0 < beam_width <= MAX_BEAM:
            raise ConfigError(f"--beam {beam_width} is invalid: give a beam width from 1 to "
                              f"{MAX_BEAM}")
        method = method or ("beam" if beam_width or words else None)
        lex = None if method == "greedy" else self._default_lexicon(
            self.lexicon([normalize_text(w) for w in words]) if words else None)
        chunk = int(c.max_seconds * c.sample_rate)
        out = []
        for wave in tqdm(items, disable=not progress or len(items) < 2, desc="transcribe",
                         unit="file"):
            pieces = [wave[i:i + chunk] for i in range(0, len(wave), chunk)] or [wave]
            words_out = []
            for k, (piece, lp) in enumerate(zip(pieces, self.log_probs(model, pieces))):
                if silent(piece):
                    continue
                ids = self.decode(lp, method=method, beam_width=beam_width, lexicon=lex)
                offset = k * c.max_seconds
                words_out += [dict(w, start=round(w["start"] + offset, 3),
                                   end=round(w["end"] + offset, 3))
                              for w in self.word_times(lp, ids)]
            out.append({"text": " ".join(w["word"] for w in words_out),
                        "duration": round(len(wave) / c.sample_rate, 3), "words": words_out})
        return out

    def word_times(self, lp: torch.Tensor, ids: list[int]) -> list[dict]:
        """Words of a decoded transcript with start and end seconds: each character's frames
        on the best (Viterbi) alignment of the transcript; a word spans its characters."""
        ids = [i for i in ids if i > 0]
        if not ids:
            return []
        spans = forced_align(lp, ids)
        space = self.symbols.get(" ")
        words, current = [], []
        for i, span in zip(ids + [space], spans + [None]):
            if i == space or span is None:
                if current:
                    text = "".join(self.config.alphabet[j - 1] for j, _ in current)
                    words.append({"word": text,
                                  "start": round(current[0][1][0] * self.config.frame_seconds, 3),
                                  "end": round((current[-1][1][1] + 1) *
                                               self.config.frame_seconds, 3)})
                current = []
            else:
                current.append((i, span))
        return words

    # ---- explaining ---------------------------------------------------------------------------
    def example_inputs(self, model_cfg, batch: int, length: int | None):
        T = length or model_cfg.context
        frames = T * self.config.subsample
        return (torch.randn(batch, frames, self.config.n_mels),
                torch.full((batch,), frames)), T

    def attention_inputs(self, wave: torch.Tensor) -> tuple:
        c = self.config
        return self.features([wave[:int(c.max_seconds * c.sample_rate)]])

    def draw_attention(self, wave, weights, outputs, title, *, top_k: int = 5):
        """The attention over the audio's frames (query time by key time) under its log-mel
        spectrogram."""
        from ..train.plots import figure
        c = self.config
        frames, _ = self.attention_inputs(wave)
        seconds = min(len(wave), int(c.max_seconds * c.sample_rate)) / c.sample_rate
        fig, axes = figure(9, 6, rows=2, sharex=True, gridspec_kw={"height_ratios": [1, 2]})
        axes[0].imshow(frames[0].T.numpy(), origin="lower", aspect="auto", cmap="magma",
                       extent=(0, seconds, 0, c.n_mels))
        axes[0].set_ylabel("mel bin")
        axes[0].set_title("log-mel frames", fontsize=9)
        axes[1].imshow(weights.numpy(), origin="lower", aspect="auto", cmap="viridis",
                       extent=(0, seconds, 0, seconds))
        axes[1].set_xlabel("key time (s)")
        axes[1].set_ylabel("query time (s)")
        axes[1].set_title(title, fontsize=9)
        return fig, {"seconds": seconds, "tokens": weights.size(0),
                     "attention": weights.tolist()}


def _data_path(config: SpeechConfig) -> Path:
    return find_data(BUILTIN.get(config.data, config.data))


def _model_config(config: SpeechConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The trunk of a speech model: long enough for max_seconds of audio, no vocabulary."""
    return model_cfg.replace(context=config.max_tokens, vocab_size=0)
