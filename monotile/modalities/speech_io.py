"""Reading recordings with their transcripts, and writing transcripts as subtitles.

Data sets: the Free Spoken Digit Dataset ({digit}_{speaker}_{index}.wav, its test split index
           0-4); a manifest .csv/.tsv of path, transcript[, speaker]; a LibriSpeech-style folder
           of <id> <TRANSCRIPT> lines in *.trans.txt beside the audio; a folder with train/ and
           test/ (or val/) of any of these. Without a test split a val_fraction is held out
           with split_seed; holdout_speaker tests on one speaker and trains on the others.
Text:      transcripts are compared and spelled lower case, letters, digits and apostrophes,
           single spaces (normalize_text); a Whisper run is scored after normalize_english,
           which also drops bracketed annotations, fillers and edge apostrophes and spells
           0-99 out
Scores:    WER = word edits / reference words, CER = character edits / reference characters,
           pooled over the files (metrics.error_rates); RTF = decoding seconds / audio seconds
Files:     txt, vtt, srt, tsv, json as openai-whisper's CLI writes them (whisper/utils.py): a
           cue per segment, timed by its words when it has them; CTC words are grouped into
           segments of at most 42 characters and 5 s
Transcriber: what the CTC recogniser and Whisper share as tasks (audio in, transcripts out)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import re
import time
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..data import listed_file, read_each
from ..errors import ConfigError, DataError
from .audio import AUDIO_SUFFIXES, read_audio
from .base import TaskBase
from .metrics import edit_distance

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


FILLERS = frozenset({"uh", "um", "umm", "hmm", "mm", "mmm", "mhm", "er", "erm", "ah"})
UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen "
         "fourteen fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(n: int) -> str:
    """0-99 in English words: 7 -> "seven", 42 -> "forty two"."""
    if n < 20:
        return UNITS[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else " " + UNITS[n % 10])


def normalize_english(text: str) -> str:
    """The English normalisation a Whisper run is scored after, on both the reference and
    the transcript: NFKC and lower case; text in [brackets], (parentheses) or <angles>
    dropped (annotations such as [Music]); "&" read "and"; thousands separators dropped
    (1,000 -> 1000); then normalize_text (punctuation and hyphens become spaces, letters,
    digits and apostrophes kept, single spaces); apostrophes at a word's edges dropped
    (quotes), inside kept (don't); the fillers uh, um, umm, hmm, mm, mmm, mhm, er, erm, ah
    dropped; a number 0-99 written in digits spelled out (2 -> two, 21 -> twenty one), larger
    ones left as digits. Not done: British/American spellings, contractions, larger numbers."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>", " ", text).replace("&", " and ")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)
    words = []
    for w in normalize_text(text).split():
        w = w.strip("'")
        if not w or w in FILLERS:
            continue
        words += number_words(int(w)).split() if w.isdigit() and len(w) <= 2 else [w]
    return " ".join(words)


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


# ---- scoring transcripts ----------------------------------------------------------------------

def score_recordings(task, model, path: str | Path, *, normalize=normalize_english,
                     progress: bool = False, **options) -> dict:
    """The task's transcripts of every recording `path` lists (a manifest of path,transcript,
    a LibriSpeech-style folder or FSDD recordings) scored against their transcripts, both
    `normalize`d: WER and CER pooled over the files as metrics.error_rates pools them (each
    file's edit distances counted once), each file's own in
    "files", and the real-time factor, decoding seconds / audio seconds."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"{path} does not exist; give a manifest .csv/.tsv of path,transcript "
                        "or a LibriSpeech-style folder")
    items, test = list_utterances(task.config, path)
    waves, kept = read_each(items + (test or []), lambda u: task.read(u.path), "eval")
    began = time.perf_counter()
    results = task.predict(model, waves, progress=progress, **options)
    seconds = time.perf_counter() - began
    refs = [normalize(u.text) for u in kept]
    hyps = [normalize(r["text"]) for r in results]
    audio = sum(r["duration"] for r in results)
    files = []
    for u, r, ref, hyp in zip(kept, results, refs, hyps):
        words, chars = edit_distance(ref.split(), hyp.split()), edit_distance(ref, hyp)
        files.append({"path": str(u.path), "reference": ref, "hypothesis": hyp,
                      "text": r["text"], "words": len(ref.split()), "word_errors": words,
                      "wer": words / max(len(ref.split()), 1),
                      "cer": chars / max(len(ref), 1), "char_errors": chars})
    # pooled as metrics.error_rates pools them (jiwer's way), from each file's distances
    pooled = {"wer": sum(f["word_errors"] for f in files) / max(sum(len(r.split())
                                                                    for r in refs), 1),
              "cer": sum(f["char_errors"] for f in files) / max(sum(len(r) for r in refs), 1)}
    return {**pooled, "files": len(files), "audio_seconds": round(audio, 3),
            "seconds": round(seconds, 3), "real_time_factor": seconds / max(audio, 1e-9),
            "per_file": files}


def format_scores(figures: dict) -> str:
    """`monotile eval`'s lines for a scored transcription: the pooled figures, then a line per
    file (WER, CER, the reference and the normalised transcript where they differ)."""
    lines = [f"{k:>16}  {v:.4f}" if isinstance(v, float) else f"{k:>16}  {v}"
             for k, v in figures.items() if k != "per_file"]
    if figures.get("per_file"):
        lines += ["", f"{'wer':>7} {'cer':>7}  file"]
        for f in figures["per_file"]:
            lines.append(f"{f['wer']:7.4f} {f['cer']:7.4f}  {f['path']}")
            if f["reference"] != f["hypothesis"]:
                lines += [f"{'':17}ref: {f['reference']}", f"{'':17}hyp: {f['hypothesis']}"]
    return "\n".join(lines)


# ---- transcripts as files: openai-whisper's writers --------------------------------------------

FILE_FORMATS = ("txt", "vtt", "srt", "tsv", "json")  # `--format all` writes each


def word_cues(words: list[dict], max_chars: int = 42, max_seconds: float = 5.0) -> list[list]:
    """Consecutive words in groups of at most max_chars characters (spaces between) and
    max_seconds from the first word's start to the last word's end."""
    cues, current = [], []
    for w in words:
        text = " ".join(x["word"] for x in current + [w])
        if current and (len(text) > max_chars or w["end"] - current[0]["start"] > max_seconds):
            cues.append(current)
            current = []
        current.append(w)
    if current:
        cues.append(current)
    return cues


def segments_of(result: dict) -> list[dict]:
    """A transcript's segments: a Whisper's own {"start", "end", "text"[, "words"]}, or a CTC
    run's words grouped by word_cues, each a segment with its words."""
    if "segments" in result:
        return result["segments"]
    return [{"start": c[0]["start"], "end": c[-1]["end"], "text": " ".join(w["word"] for w in c),
             "words": c} for c in word_cues(result.get("words") or [])]


def timestamp(seconds: float, *, hours: bool = True, marker: str = ",") -> str:
    """whisper's format_timestamp: [HH:]MM:SS<marker>mmm, the hours always (SubRip) or only
    past the first hour (WebVTT)."""
    ms = round(seconds * 1000)
    h, ms = divmod(ms, 3_600_000)
    m, ms = divmod(ms, 60_000)
    s, ms = divmod(ms, 1000)
    return (f"{h:02d}:" if hours or h else "") + f"{m:02d}:{s:02d}{marker}{ms:03d}"


def cues(segments: list[dict]) -> list[tuple[float, float, str]]:
    """(start, end, text) of each subtitle, as whisper's SubtitlesWriter makes them with its
    default options: one per segment; a segment with words is timed from its first word's
    start to its last word's end and spelled by its words (none: no cue), one without by its
    own times and stripped text, "-->" written "->"."""
    out = []
    for seg in segments:
        if "words" not in seg:
            out.append((seg["start"], seg["end"], seg["text"].strip().replace("-->", "->")))
            continue
        words = seg["words"]
        if not words:
            continue
        if any(w["word"][:1].isspace() for w in words[1:]):  # whisper's: " word" each
            text = words[0]["word"].strip() + "".join(w["word"] for w in words[1:])
        else:  # a CTC run's bare words
            text = " ".join(w["word"].strip() for w in words)
        out.append((words[0]["start"], words[-1]["end"], text))
    return out


def transcript_file(result: dict, fmt: str, language: str | None = None) -> str:
    """One recording's transcript as openai-whisper's CLI writes it: txt (a segment a line),
    vtt (WEBVTT, MM:SS.mmm cues), srt (numbered, HH:MM:SS,mmm), tsv (start<TAB>end<TAB>text,
    integer milliseconds, under a header) or json ({"text", "segments", "language"})."""
    segments = segments_of(result)
    if fmt == "txt":
        return "".join(s["text"].strip() + "\n" for s in segments)
    if fmt == "vtt":
        return "WEBVTT\n\n" + "".join(
            f"{timestamp(a, hours=False, marker='.')} --> "
            f"{timestamp(b, hours=False, marker='.')}\n{t}\n\n" for a, b, t in cues(segments))
    if fmt == "srt":
        return "".join(f"{i}\n{timestamp(a)} --> {timestamp(b)}\n{t}\n\n"
                       for i, (a, b, t) in enumerate(cues(segments), 1))
    if fmt == "tsv":
        return "start\tend\ttext\n" + "".join(
            f"{round(1000 * s['start'])}\t{round(1000 * s['end'])}\t"
            f"{s['text'].strip().replace(chr(9), ' ')}\n" for s in segments)
    if fmt == "json":
        return json.dumps({"text": result["text"],
                           "segments": [{"id": i, **s} for i, s in enumerate(segments)],
                           "language": result.get("language", language)})
    raise ConfigError(f"format {fmt!r} is not a transcript file format: choose "
                      f"{', '.join(FILE_FORMATS)} or all")


def to_srt(items: list[dict]) -> str:
    """SubRip subtitles of words (a CTC run's: cues of at most 42 characters and 5 s) or of
    segments ({"text", "start", "end"}, Whisper's: a cue each)."""
    result = {"segments": items} if items and "text" in items[0] else {"words": items}
    return transcript_file(result, "srt")


class Transcriber(TaskBase):
    """What both speech recognisers share, the CTC model (speech.py) and an imported Whisper
    (whisper.py): audio in, from files or their bytes; transcripts out, as text, JSON,
    subtitles or CSV rows, or as openai-whisper's files; the transcriptions route."""

    what = "audio"
    suffixes = AUDIO_SUFFIXES
    formats = ("text", "json", *FILE_FORMATS[:4], "all")
    file_formats = FILE_FORMATS
    routes = ("transcriptions",)
    language: str | None = None  # the language of a result that names none (json files)

    def read(self, source) -> torch.Tensor:
        """An audio file (or its bytes) -> the mono waveform at the run's sample rate, within
        audio.read_audio's limits."""
        if not isinstance(source, (bytes, bytearray)):
            source = Path(source).expanduser()
        return read_audio(source, self.config.sample_rate)

    def format_predictions(self, summary: dict, fmt: str = "text") -> str:
        return format_transcripts(summary, fmt)

    def rows(self, summary: dict) -> tuple[list[str], list[list]]:
        return transcript_rows(summary)

    def output_files(self, summary: dict, fmt: str) -> dict[str, str]:
        """{file name: text} of each recording's transcript in `fmt` ("text" is txt; "all"
        every file format), named from the audio's stem (talk.wav -> talk.srt); two
        recordings of one stem are refused."""
        formats = FILE_FORMATS if fmt == "all" else ("txt" if fmt == "text" else fmt,)
        files, source = {}, {}
        for r in summary["predictions"]:
            stem = Path(r["path"]).stem
            if stem in source:
                raise DataError(f"{source[stem]} and {r['path']} would both be written as "
                                f"{stem}.*; transcribe them into different --output-dir "
                                "folders")
            source[stem] = r["path"]
            for ext in formats:
                files[f"{stem}.{ext}"] = transcript_file(r, ext, self.language)
        return files


def format_transcripts(summary: dict, fmt: str) -> str:
    """Transcripts for people: the text alone for one recording, "path<TAB>text" lines for
    several (fmt="text"); or each recording's txt, srt, vtt or tsv file (transcript_file),
    under a "==> path <==" line when there are several."""
    preds = summary["predictions"]
    single = len(preds) == 1 and not summary.get("skipped")
    if fmt in FILE_FORMATS:
        return "".join(("" if single else f"{'' if i == 0 else chr(10)}==> {r['path']} <==\n")
                       + transcript_file(r, fmt) for i, r in enumerate(preds)).rstrip("\n")
    if fmt == "all":
        raise ConfigError("--format all writes every file format; give --output-dir DIR")
    return "\n".join(r["text"] if single else f"{r['path']}\t{r['text']}" for r in preds)


def transcript_rows(summary: dict) -> tuple[list[str], list[list]]:
    """path, text, duration per recording, for `predict --output`."""
    return ["path", "text", "duration"], [[r["path"], r["text"], f"{r['duration']:.3f}"]
                                          for r in summary["predictions"]]
