"""Audio in: files to waveforms at the model's rate, waveforms to Whisper's log-mel frames.

Read:     soundfile decodes WAV/FLAC/OGG of any rate, depth and channel count; channels are
          averaged to mono and the rate is changed with scipy's polyphase resampler.
Limits:   a recording is decoded only if its header declares a sample rate of 4-384 kHz, at
          most 64 channels, at most 4 hours (MAX_AUDIO_SECONDS: a long meeting, transcribed
          window after window) and at most 2^30 samples over its channels (4 GiB as float32);
          its samples must be finite and within +-1e6 (a float file's belong in [-1, 1]). A
          rate ratio that does not reduce to terms of at most 10,000 (resampling by p/q designs
          a filter of 20 max(p, q) taps) is taken as the nearest one that does, off by at most
          5e-5 (383,999 Hz is read as 384,000 Hz).
STFT:     X[m, k] = sum_n x[m h + n - N/2] w[n] exp(-2 pi i k n / N), the signal reflected at
          both ends (centred frames), w the periodic Hann window of N = n_fft samples, hop h
Mel:      mel(f) = 3 f / 200 below 1 kHz, 15 + 27 ln(f / 1000) / ln 6.4 above (Slaney);
          M triangular filters with corners equally spaced in mel, each scaled by
          2 / (f_{m+2} - f_m) so its area is constant (Slaney normalisation)
Log-mel:  L = log10(max(M |X|^2, 1e-10)); L = max(L, max(L) - 8); L = (L + 4) / 4  (Whisper:
          an 80 dB floor below each utterance's loudest bin, then roughly unit scale)
Stem:     frames -> tokens by a 3-wide convolution and GELU, then log2(s) stride-2 3-wide
          convolutions and GELU, each halving the frame rate (Whisper's encoder stem, s = 2)

Written on torch (no torchaudio, no librosa); tests check them against torch.stft and
transformers' WhisperFeatureExtractor.
"""

from __future__ import annotations

import io
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".aiff", ".aif", ".mp3")
SILENCE = 1e-4  # a peak below -80 dBFS is silence: nothing to transcribe
MIN_RATE, MAX_RATE = 4_000, 384_000  # the sample rates (Hz) a recording may declare
MAX_CHANNELS = 64
MAX_AUDIO_SECONDS = 4 * 3600  # the longest recording read: a long meeting
MAX_AUDIO_SAMPLES = 2 ** 30  # frames x channels decoded at once: 4 GiB as float32
MAX_RATIO_TERMS = 10_000  # resampling by p/q designs a filter of 20 max(p, q) taps
MAX_SAMPLE = 1e6  # a sample beyond this is not audio (a float file's belong in [-1, 1])


def read_audio(source: Path | bytes, sample_rate: int) -> torch.Tensor:
    """Any audio soundfile reads, a file or its bytes -> float32 mono waveform (N,) at
    sample_rate, values in [-1, 1]; DataError if it is not readable audio, or outside the
    limits (module docstring): the header's rate, channels and length are checked before a
    sample is decoded, the samples after."""
    import soundfile as sf

    upload = isinstance(source, (bytes, bytearray))
    what = "the upload" if upload else source
    try:
        info = sf.info(io.BytesIO(source) if upload else str(source))
        _check_header(what, int(info.samplerate), int(info.channels), int(info.frames))
        data, rate = sf.read(io.BytesIO(source) if upload else str(source), dtype="float32",
                             always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        raise DataError(f"{what} is not a readable audio file ({str(e).strip().rstrip('.')}); "
                        "give a WAV, FLAC or OGG file") from None
    if len(data) > MAX_AUDIO_SECONDS * rate:  # a header that did not know its length
        raise DataError(f"{what} lasts more than the {MAX_AUDIO_SECONDS // 3600} h this reads; "
                        "cut it into parts")
    if data.size and not (np.isfinite(data).all() and np.abs(data).max() <= MAX_SAMPLE):
        raise DataError(f"{what} holds samples that are not finite (NaN or infinity) or "
                        f"beyond +-{MAX_SAMPLE:,.0f}; give audio whose samples are numbers in "
                        "[-1, 1]")
    mono = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    return torch.from_numpy(np.ascontiguousarray(resample(mono, rate, sample_rate)))


def _check_header(what, rate: int, channels: int, frames: int) -> None:
    """Refuse what a recording's header declares beyond the limits, before decoding it."""
    if not MIN_RATE <= rate <= MAX_RATE:
        raise DataError(f"{what} declares a sample rate of {rate} Hz, outside the {MIN_RATE}-"
                        f"{MAX_RATE} Hz this reads; give a recording at an ordinary rate "
                        "(8, 16, 44.1 or 48 kHz)")
    if not 0 < channels <= MAX_CHANNELS:
        raise DataError(f"{what} declares {channels} channels; this reads 1 to {MAX_CHANNELS}: "
                        "give it mono or stereo")
    if frames >= 2 ** 62:  # libsndfile's "unknown length": checked once decoded
        return
    if frames > MAX_AUDIO_SECONDS * rate:
        raise DataError(f"{what} lasts {frames / rate:,.0f} s, longer than the "
                        f"{MAX_AUDIO_SECONDS:,} s ({MAX_AUDIO_SECONDS // 3600} h) this reads; cut "
                        "it into parts (e.g. ffmpeg -i IN -f segment -segment_time 3600 "
                        "part%d.wav)")
    if frames * channels > MAX_AUDIO_SAMPLES:
        raise DataError(f"{what} holds {frames * channels:,} samples ({channels} channels at "
                        f"{rate} Hz), more than the {MAX_AUDIO_SAMPLES:,} this decodes at once; "
                        "give it as mono at 16 kHz, or cut it into parts")


def resample(x: np.ndarray, rate: int, target: int) -> np.ndarray:
    """Polyphase resampling by up/down = target/rate in lowest terms (scipy.signal.resample_poly:
    zero insertion, a Kaiser-windowed low-pass FIR, decimation). A ratio whose terms exceed
    MAX_RATIO_TERMS is replaced by the nearest one within them (Fraction.limit_denominator)."""
    if rate == target or len(x) == 0:
        return x.astype(np.float32, copy=False)
    from scipy.signal import resample_poly

    ratio = Fraction(int(target), int(rate))
    if max(ratio.numerator, ratio.denominator) > MAX_RATIO_TERMS:
        ratio = ratio.limit_denominator(MAX_RATIO_TERMS)
        if ratio.numerator > MAX_RATIO_TERMS:  # an upsampling ratio: bound its other term
            ratio = 1 / (1 / ratio).limit_denominator(MAX_RATIO_TERMS)
    return resample_poly(x, ratio.numerator, ratio.denominator).astype(np.float32)


def hann_window(n: int, device=None) -> torch.Tensor:
    """w[i] = sin^2(pi i / n), i < n: the periodic Hann window (torch.hann_window's default)."""
    return torch.sin(math.pi * torch.arange(n, device=device) / n) ** 2


def stft(x: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, N) waveforms -> (B, n_fft // 2 + 1, 1 + N // hop) complex spectra of centred,
    Hann-windowed frames (torch.stft(center=True, pad_mode="reflect") written out)."""
    pad = n_fft // 2
    if x.size(-1) <= pad:  # too short to reflect: extend with silence first
        x = F.pad(x, (0, pad + 1 - x.size(-1)))
    x = F.pad(x[:, None], (pad, pad), mode="reflect")[:, 0]
    frames = x.unfold(-1, n_fft, hop)  # (B, frames, n_fft)
    return torch.fft.rfft(frames * hann_window(n_fft, x.device), dim=-1).transpose(1, 2)


def hz_to_mel(f: torch.Tensor) -> torch.Tensor:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    f = torch.as_tensor(f, dtype=torch.float64)
    return torch.where(f < 1000, 3 * f / 200, 15 + torch.log(f.clamp_min(1e-10) / 1000) * 27
                       / math.log(6.4))


def mel_to_hz(m: torch.Tensor) -> torch.Tensor:
    m = torch.as_tensor(m, dtype=torch.float64)
    return torch.where(m < 15, 200 * m / 3, 1000 * torch.exp((m - 15) * math.log(6.4) / 27))


def mel_filters(sample_rate: int, n_fft: int, n_mels: int, f_min: float = 0.0,
                f_max: float | None = None) -> torch.Tensor:
    """(n_mels, n_fft // 2 + 1) Slaney-normalised triangular filters on the Slaney mel scale
    (librosa.filters.mel(norm="slaney") and transformers' mel_filter_bank agree)."""
    f_max = sample_rate / 2 if f_max is None else f_max
    if not 0 <= f_min < f_max <= sample_rate / 2:
        raise ValueError(f"mel band {f_min}-{f_max} Hz must lie in 0-{sample_rate / 2} Hz")
    fft_freqs = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1, dtype=torch.float64)
    corners = mel_to_hz(torch.linspace(hz_to_mel(f_min).item(), hz_to_mel(f_max).item(),
                                       n_mels + 2, dtype=torch.float64))
    lower, centre, upper = corners[:-2, None], corners[1:-1, None], corners[2:, None]
    rising = (fft_freqs - lower) / (centre - lower)
    falling = (upper - fft_freqs) / (upper - centre)
    tri = torch.clamp(torch.minimum(rising, falling), min=0)
    return (tri * (2 / (upper - lower))).float()


def log_mel(x: torch.Tensor, filters: torch.Tensor, n_fft: int, hop: int) -> torch.Tensor:
    """(B, N) or (N,) waveforms -> (B, n_mels, N // hop) Whisper log-mel frames (the last STFT
    frame dropped, as Whisper does); each item's floor is 8 (80 dB) below its own maximum."""
    squeeze = x.dim() == 1
    x = x[None] if squeeze else x
    power = stft(x.float(), n_fft, hop)[..., :-1].abs() ** 2
    frames = x.size(-1) // hop
    power = power[..., :frames]
    spec = torch.clamp(filters.to(x.device) @ power, min=1e-10).log10()
    if spec.numel():
        peak = spec.amax(dim=(1, 2), keepdim=True)
        spec = torch.maximum(spec, peak - 8.0)
    spec = (spec + 4.0) / 4.0
    return spec[0] if squeeze else spec


def silent(wave: torch.Tensor) -> bool:
    """Empty, or a peak below -80 dBFS: nothing to transcribe."""
    return len(wave) == 0 or float(wave.abs().max()) < SILENCE


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
