"""English recordings with known transcripts, spoken by Debian's espeak-ng and joined by sox.

    sentences(n)                  n sentences of 6-20 words from the public-domain speeches
    speak(text, path, voice)      one 16-kHz mono WAV of `text`
    recording(texts, path, voice) the texts spoken one after another (with `gap` seconds of
                                  silence between them) in one WAV, and each one's (start, end)

The voices are espeak-ng's (`en-us`, `en-gb`, `en-us+f3` ...): synthetic, but two or more of
them give different accents and pitches. Used by the Whisper tests and benches; a test that
needs them skips when espeak-ng or sox is missing (.ci/run installs both).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import soundfile as sf

SPEECHES = Path(__file__).resolve().parents[2] / "shared/data/speeches/speeches_public_domain.txt"
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb+m3")
AVAILABLE = bool(shutil.which("espeak-ng") and shutil.which("sox"))
SKIP_REASON = "needs espeak-ng and sox (Debian: apt-get install espeak-ng sox)"


def sentences(n: int, *, offset: int = 0, source: Path = SPEECHES) -> list[str]:
    """n plain sentences of 6-20 words (letters, commas and a final period only: no numbers
    or abbreviations, whose spelling a recogniser may legitimately choose), in file order
    from the `offset`-th such sentence on."""
    text = " ".join(source.read_text(encoding="utf-8").split())
    out = []
    for s in re.split(r"(?<=[.!?])\s+", text):
        words = s.split()
        if 6 <= len(words) <= 20 and re.fullmatch(r"[A-Z][A-Za-z ,']*[a-z]\.", s):
            out.append(s)
    if len(out) < offset + n:
        raise ValueError(f"only {len(out)} sentences in {source}")
    return out[offset:offset + n]


def speak(text: str, path: Path, voice: str = "en-us", *, speed: int = 160,
          rate: int = 16000) -> Path:
    """`text` spoken by espeak-ng's `voice` at `speed` words a minute, as `rate`-Hz mono
    16-bit PCM."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(raw), text],
                   check=True, capture_output=True)
    subprocess.run(["sox", str(raw), "-r", str(rate), "-c", "1", "-b", "16", str(path)],
                   check=True, capture_output=True)
    raw.unlink()
    return path


def recording(texts: list[str], path: Path, voice: str = "en-us", *, gap: float = 0.5,
              speed: int = 160, rate: int = 16000) -> list[tuple[float, float]]:
    """The texts spoken one after another into `path`, `gap` seconds of silence after each;
    returns each text's (start, end) in seconds (espeak-ng's own leading and trailing
    silence included)."""
    parts, spans, t = [], [], 0.0
    for i, text in enumerate(texts):
        part = speak(text, path.with_name(f"{path.stem}.part{i}.wav"), voice, speed=speed,
                     rate=rate)
        seconds = sf.info(str(part)).frames / rate
        spans.append((round(t, 3), round(t + seconds, 3)))
        t += seconds + gap
        parts.append(part)
    silence = path.with_name(f"{path.stem}.gap.wav")
    subprocess.run(["sox", "-n", "-r", str(rate), "-c", "1", "-b", "16", str(silence),
                    "trim", "0", str(gap)], check=True, capture_output=True)
    joined = [str(x) for p in parts for x in (p, silence)]
    subprocess.run(["sox", *joined, str(path)], check=True, capture_output=True)
    for p in [*parts, silence]:
        p.unlink()
    return spans
