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

import csv
import dataclasses
import math
import unicodedata
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.transformer import ModelConfig, Transformer, init_weights
from ..data import expand_inputs, find_data, nothing_readable
from ..errors import DataError, check_positive, invalid
from ..infer.ctc import Lexicon, beam_search, ctc_loss, forced_align, greedy_decode
from .audio import AUDIO_SUFFIXES, log_mel, mel_filters, read_audio

BUILTIN = {"fsdd": "fsdd/recordings"}
FSDD_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SILENCE = 1e-4  # a peak below -80 dBFS is silence: an empty transcript


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

class Subsampler(nn.Module):
    """(B, T, n_mels) -> (B, ceil(T / s), d): a 3-wide convolution to d channels and GELU,
    then log2(s) stride-2 3-wide convolutions and GELU (Whisper's stem has s = 2)."""

    def __init__(self, n_mels: int, d: int, subsample: int):
        super().__init__()
        layers = [nn.Conv1d(n_mels, d, 3, padding=1), nn.GELU()]
        for _ in range(int(math.log2(subsample))):
            layers += [nn.Conv1d(d, d, 3, stride=2, padding=1), nn.GELU()]
        self.convs = nn.Sequential(*layers)
        self.subsample = subsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.convs(x.transpose(1, 2)).transpose(1, 2)

    def lengths(self, frames: torch.Tensor) -> torch.Tensor:
        for _ in range(int(math.log2(self.subsample))):
            frames = (frames + 1) // 2  # floor((T + 2 - 3) / 2) + 1
        return frames


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


# ---- text -----------------------------------------------------------------------------------

def normalize_text(text: str) -> str:
    """Lower case, letters, digits and apostrophes; anything else becomes a space; single
    spaces (what WER compares and what the model spells)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    text = "".join(c if c.isalnum() or c == "'" else " " for c in text)
    return " ".join(text.split())


def edit_distance(ref, hyp) -> int:
    """Levenshtein distance: the fewest substitutions, deletions and insertions turning ref
    into hyp; D[i][j] = min(D[i-1][j] + 1, D[i][j-1] + 1, D[i-1][j-1] + [ref_i != hyp_j])."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def error_rates(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """WER = sum of word edit distances / reference words; CER the same over characters
    (spaces included), both pooled over the corpus as jiwer computes them."""
    words = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    chars = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    n_words = sum(len(r.split()) for r in refs)
    n_chars = sum(len(r) for r in refs)
    return {"wer": words / max(n_words, 1), "cer": chars / max(n_chars, 1)}


# ---- reading data ---------------------------------------------------------------------------

@dataclass
class Utterance:
    path: Path
    text: str
    speaker: str = ""


def _fsdd(root: Path) -> tuple[list[Utterance], list[Utterance] | None]:
    """{digit}_{speaker}_{index}.wav; the official test split is index 0-4."""
    items, test = [], []
    for p in sorted(root.glob("*.wav")):
        parts = p.stem.split("_")
        if len(parts) != 3 or not parts[0].isdigit() or not parts[2].isdigit():
            continue
        u = Utterance(p, FSDD_WORDS[int(parts[0])], parts[1])
        (test if int(parts[2]) < 5 else items).append(u)
    if not items:
        raise DataError(f"{root} holds no FSDD recordings ({{digit}}_{{speaker}}_{{index}}.wav)")
    return items, test


def _manifest(path: Path) -> list[Utterance]:
    """Lines of path, transcript[, speaker]; comma or tab separated; a header is optional."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path} is not a UTF-8 manifest; give lines of path,transcript") \
            from None
    delimiter = "\t" if path.suffix.lower() == ".tsv" or "\t" in text.split("\n", 1)[0] else ","
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if r]
    if rows and rows[0][0].strip().lower() in ("path", "file", "audio", "filename"):
        rows = rows[1:]
    if not rows or any(len(r) < 2 for r in rows):
        raise DataError(f"{path} must hold lines of path{delimiter!r}transcript (one recording "
                        "each), optionally a third column with the speaker")
    out = []
    for r in rows:
        file = Path(r[0].strip())
        file = file if file.is_absolute() else path.parent / file
        if not file.exists():
            raise DataError(f"{path}: recording {file} does not exist; fix the path (relative "
                            "paths are read from the manifest's folder)")
        out.append(Utterance(file, r[1], r[2].strip() if len(r) > 2 else ""))
    return out


def _librispeech(root: Path) -> list[Utterance]:
    """Every <id> <TRANSCRIPT> line of every *.trans.txt, audio in <id>.flac (or .wav) beside
    it; the speaker is the id up to its first dash."""
    out = []
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            if not line.strip():
                continue
            uid, _, words = line.strip().partition(" ")
            audio = next((trans.parent / f"{uid}{s}" for s in (".flac", ".wav", ".ogg")
                          if (trans.parent / f"{uid}{s}").exists()), None)
            if audio is None:
                raise DataError(f"{trans}: no audio file {uid}.flac or {uid}.wav beside it")
            out.append(Utterance(audio, words, uid.split("-")[0]))
    return out


def list_utterances(cfg: SpeechConfig, path: Path) -> tuple[list[Utterance], list | None]:
    """(train-or-all utterances, the data's own test utterances or None)."""
    if path.is_dir():
        if (path / "train").is_dir() and ((path / "test").is_dir() or (path / "val").is_dir()):
            test_dir = path / "test" if (path / "test").is_dir() else path / "val"
            return list_utterances(cfg, path / "train")[0], list_utterances(cfg, test_dir)[0]
        if any(path.rglob("*.trans.txt")):
            items = _librispeech(path)
        elif any(path.glob("[0-9]_*_[0-9]*.wav")):
            return _fsdd(path)
        else:
            raise DataError(f"{path} has no *.trans.txt transcripts or FSDD recordings; give a "
                            "manifest (path,transcript) or a LibriSpeech-style folder")
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        items = _manifest(path)
    else:
        raise DataError(f"{path}: unknown speech data; give a manifest .csv/.tsv of "
                        "path,transcript or a LibriSpeech-style folder of *.trans.txt")
    if not items:
        raise DataError(f"{path} lists no recordings")
    return items, None


def split_utterances(cfg: SpeechConfig, path: Path) -> dict[str, list[Utterance]]:
    items, test = list_utterances(cfg, path)
    if cfg.holdout_speaker:
        everyone = items + (test or [])
        speakers = sorted({u.speaker for u in everyone if u.speaker})
        if cfg.holdout_speaker not in speakers:
            raise DataError(f"speaker {cfg.holdout_speaker!r} is not in {path}; speakers: "
                            f"{', '.join(speakers) or 'none (the data names no speakers)'}")
        return {"train": [u for u in everyone if u.speaker != cfg.holdout_speaker],
                "test": [u for u in everyone if u.speaker == cfg.holdout_speaker]}
    if test is None:
        g = torch.Generator().manual_seed(cfg.split_seed)
        order = torch.randperm(len(items), generator=g).tolist()
        n_test = max(1, round(len(items) * cfg.val_fraction))
        if len(items) < 2:
            raise DataError(f"{path} lists {len(items)} recording; give at least 2 so one can "
                            "be held out for testing")
        test = [items[i] for i in sorted(order[:n_test])]
        items = [items[i] for i in sorted(order[n_test:])]
    return {"train": items, "test": test}


def _read_all(items: list[Utterance], cfg: SpeechConfig, what: str):
    """Waveforms and normalised transcripts; unreadable files are reported and skipped."""
    waves, kept, skipped = [], [], []
    for u in tqdm(items, desc=f"reading {what}", unit="file",
                  disable=True if len(items) < 2000 else None):  # None: only on a terminal
        try:
            waves.append(read_audio(u.path, cfg.sample_rate))
            kept.append(dataclasses.replace(u, text=normalize_text(u.text)))
        except DataError as e:
            skipped.append(str(e))
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(items)} {what} files could not be read and were "
                      f"skipped; the first: {skipped[0]}", stacklevel=3)
    if not waves:
        raise DataError(f"no readable recording among the {what} files; give WAV/FLAC files")
    return waves, kept


# ---- the task -----------------------------------------------------------------------------

class SpeechTask:
    """Speech recognition with CTC, scored by word and character error rates."""

    name = "speech"
    Config = SpeechConfig
    best_metric = ("wer", "min")

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

    @classmethod
    def load(cls, config: SpeechConfig, model_cfg: ModelConfig, run_dir: Path):
        return cls(config)

    def save(self, run_dir: Path) -> None:
        pass  # the alphabet and word list live in config.json

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
            self._data[name] = _read_all(self._listing[name], self.config, name)
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
        return ctc_loss(log_probs, batch["targets"], n, batch["target_lengths"],
                        zero_infinity=True)

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
        hyps = ["" if _silent(w) else self.spell(self.decode(lp, lexicon=lex))
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
            waves, items = _read_all(items + (test or []), self.config, "eval")
        else:
            waves, items = self.split("test")
        figures, refs, hyps = self._score(model, waves, items, progress)
        vocab = sorted(set(refs))
        if all(len(r.split()) == 1 for r in refs) and 1 < len(vocab) <= 50:
            from ..train.plots import plot_confusion
            from .vision import confusion_matrix, per_class_figures
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
    def predict(self, model, inputs: list, *, method: str | None = None,
                beam_width: int | None = None, words: list[str] | None = None,
                progress: bool = False) -> dict:
        """Transcripts of audio files and folders (searched recursively), with per-word start
        and end times from the CTC alignment. Audio longer than max_seconds is transcribed in
        chunks. Unreadable files are reported in "skipped"; if nothing is readable, DataError.

        Returns {"predictions": [{"path", "text", "duration", "words": [{"word", "start",
        "end"}]}], "skipped": [...]}."""
        c = self.config
        files = expand_inputs(inputs, AUDIO_SUFFIXES, "audio")
        lex = None if method == "greedy" else self._default_lexicon(
            self.lexicon([normalize_text(w) for w in words]) if words else None)
        predictions, skipped = [], []
        chunk = int(c.max_seconds * c.sample_rate)
        for path in tqdm(files, disable=not progress or len(files) < 2, desc="transcribe",
                         unit="file"):
            try:
                wave = read_audio(path, c.sample_rate)
            except DataError as e:
                skipped.append({"path": str(path), "error": str(e)})
                continue
            pieces = [wave[i:i + chunk] for i in range(0, len(wave), chunk)] or [wave]
            words_out = []
            for k, (piece, lp) in enumerate(zip(pieces, self.log_probs(model, pieces))):
                if _silent(piece):
                    continue
                ids = self.decode(lp, method=method, beam_width=beam_width, lexicon=lex)
                offset = k * c.max_seconds
                words_out += [dict(w, start=round(w["start"] + offset, 3),
                                   end=round(w["end"] + offset, 3))
                              for w in self.word_times(lp, ids)]
            predictions.append({"path": str(path),
                                "text": " ".join(w["word"] for w in words_out),
                                "duration": round(len(wave) / c.sample_rate, 3),
                                "words": words_out})
        if not predictions:
            raise nothing_readable(skipped, "readable audio")
        return {"predictions": predictions, "skipped": skipped}

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


def _silent(wave: torch.Tensor) -> bool:
    """Empty, or a peak below -80 dBFS: nothing to transcribe."""
    return len(wave) == 0 or float(wave.abs().max()) < SILENCE


def _data_path(config: SpeechConfig) -> Path:
    return find_data(BUILTIN.get(config.data, config.data))


def _model_config(config: SpeechConfig, model_cfg: ModelConfig) -> ModelConfig:
    """The trunk of a speech model: long enough for max_seconds of audio, no vocabulary."""
    return model_cfg.replace(context=config.max_tokens, vocab_size=0)


def to_srt(words: list[dict], max_chars: int = 42, max_seconds: float = 5.0) -> str:
    """SubRip cues of consecutive words, each at most max_chars characters and max_seconds;
    segments ({"text", "start", "end"}, Whisper's) are a cue each."""
    cues, current = [], []
    for w in words:
        if "text" in w:  # a segment
            cues += [current, [w]] if current else [[w]]
            current = []
            continue
        text = " ".join(x["word"] for x in current + [w])
        if current and (len(text) > max_chars or w["end"] - current[0]["start"] > max_seconds):
            cues.append(current)
            current = []
        current.append(w)
    if current:
        cues.append(current)

    def stamp(t: float) -> str:
        ms = round(t * 1000)
        return f"{ms // 3600000:02d}:{ms // 60000 % 60:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"
    return "".join(f"{i}\n{stamp(c[0]['start'])} --> {stamp(c[-1]['end'])}\n"
                   f"{' '.join(w.get('word', w.get('text')) for w in c)}\n\n"
                   for i, c in enumerate(cues, 1))
