"""Reading recordings with their transcripts, and writing transcripts as subtitles.

Data sets: the Free Spoken Digit Dataset ({digit}_{speaker}_{index}.wav, its test split index
           0-4); a manifest .csv/.tsv of path, transcript[, speaker]; a LibriSpeech-style folder
           of <id> <TRANSCRIPT> lines in *.trans.txt beside the audio; a folder with train/ and
           test/ (or val/) of any of these. Without a test split a val_fraction is held out
           with split_seed; holdout_speaker tests on one speaker and trains on the others.
Text:      transcripts are compared and spelled lower case, letters, digits and apostrophes,
           single spaces (normalize_text)
Subtitles: SubRip cues of consecutive words, at most 42 characters and 5 s each
Transcriber: what the CTC recogniser and Whisper share as tasks (audio in, transcripts out)
"""

from __future__ import annotations

import csv
import dataclasses
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data import listed_file, read_each
from ..errors import DataError
from .audio import AUDIO_SUFFIXES, read_audio
from .base import TaskBase

if TYPE_CHECKING:
    from .speech import SpeechConfig

BUILTIN = {"fsdd": "fsdd/recordings"}
MAX_BEAM = 128  # the widest beam a prediction may ask for
FSDD_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def normalize_text(text: str) -> str:
    """Lower case, letters, digits and apostrophes; anything else becomes a space; single
    spaces (what WER compares and what the model spells)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    text = "".join(c if c.isalnum() or c == "'" else " " for c in text)
    return " ".join(text.split())


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
    return [Utterance(listed_file(path, r[0], "recording"), r[1],
                      r[2].strip() if len(r) > 2 else "") for r in rows]


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


def read_all(items: list[Utterance], cfg: SpeechConfig, what: str):
    """Waveforms and normalised transcripts; unreadable files are reported and skipped."""
    waves, kept = read_each(items, lambda u: read_audio(u.path, cfg.sample_rate), what)
    return waves, [dataclasses.replace(u, text=normalize_text(u.text)) for u in kept]


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


class Transcriber(TaskBase):
    """What both speech recognisers share, the CTC model (speech.py) and an imported Whisper
    (whisper.py): audio in, from files or their bytes; transcripts out, as text, JSON,
    subtitles or CSV rows; the transcriptions route."""

    what = "audio"
    suffixes = AUDIO_SUFFIXES
    formats = ("text", "json", "srt")
    routes = ("transcriptions",)

    def read(self, source) -> torch.Tensor:
        """An audio file (or its bytes) -> the mono waveform at the run's sample rate."""
        if not isinstance(source, (bytes, bytearray)):
            source = Path(source).expanduser()
        return read_audio(source, self.config.sample_rate)

    def format_predictions(self, summary: dict, fmt: str = "text") -> str:
        return format_transcripts(summary, fmt)

    def rows(self, summary: dict) -> tuple[list[str], list[list]]:
        return transcript_rows(summary)


def format_transcripts(summary: dict, fmt: str) -> str:
    """Transcripts for people: the text alone for one recording, "path<TAB>text" lines for
    several; or SubRip subtitles (fmt="srt", from the words or a Whisper's segments), each
    recording's under a "==> path <==" line when there are several."""
    preds = summary["predictions"]
    single = len(preds) == 1 and not summary.get("skipped")
    if fmt == "srt":
        return "".join(("" if single else f"{'' if i == 0 else chr(10)}==> {r['path']} <==\n")
                       + to_srt(r["segments"] if "segments" in r else r["words"])
                       for i, r in enumerate(preds)).rstrip("\n") + "\n"
    return "\n".join(r["text"] if single else f"{r['path']}\t{r['text']}" for r in preds)


def transcript_rows(summary: dict) -> tuple[list[str], list[list]]:
    """path, text, duration per recording, for `predict --output`."""
    return ["path", "text", "duration"], [[r["path"], r["text"], f"{r['duration']:.3f}"]
                                          for r in summary["predictions"]]
