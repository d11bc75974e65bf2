"""Speech: features against Whisper's, metrics against jiwer, data formats, CTC end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch

import monotile
import monotile.modalities.speech
from monotile.errors import ConfigError
from monotile.data import find_data
from monotile.modalities.audio import (hann_window, log_mel, mel_filters, read_audio, resample,
                                       stft)
from monotile.modalities.metrics import edit_distance, edit_distance_reference, error_rates
from monotile.modalities.speech import SpeechConfig, SpeechTask
from monotile.modalities.speech_io import FSDD_WORDS, normalize_text, to_srt

from conftest import cli, set_args

# a CTC model that trains in seconds on 2 cores
TINY = {"n_layer": "2", "n_head": "2", "d_model": "48", "d_ff": "96", "batch_size": "16",
        "max_steps": "40", "eval_interval": "40", "log_interval": "10", "warmup_steps": "10",
        "lr": "3e-3", "ema": "0", "seed": "0", "dropout": "0"}


@pytest.fixture(scope="module")
def fsdd():
    return find_data("fsdd/recordings")


@pytest.fixture(scope="module")
def speech_run(tmp_path_factory, fsdd):
    """The fsdd preset shrunk to 15 s of training on the real recordings (no augmentation,
    four frames per token: CTC finds its feet sooner)."""
    out = tmp_path_factory.mktemp("speech") / "run"
    return monotile.train("speech", "fsdd", out=out, quiet=True, overrides=dict(
        TINY, n_layer="3", d_model="64", d_ff="128", max_steps="300", eval_interval="300",
        subsample="4", speed="0", noise="0", freq_masks="0", time_masks="0"))


# ---- features, against independent references --------------------------------------------

def test_stft_and_window_match_torch():
    x = torch.randn(3, 1234)
    torch.testing.assert_close(hann_window(400), torch.hann_window(400))
    expected = torch.stft(x, 400, 160, window=torch.hann_window(400), return_complex=True)
    torch.testing.assert_close(stft(x, 400, 160), expected, rtol=1e-4, atol=1e-4)


def test_mel_filters_match_transformers():
    from transformers.audio_utils import mel_filter_bank

    for rate, n_fft, n_mels in ((16000, 400, 80), (8000, 200, 40)):
        ref = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=n_mels,
                              min_frequency=0.0, max_frequency=rate / 2, sampling_rate=rate,
                              norm="slaney", mel_scale="slaney")
        np.testing.assert_allclose(mel_filters(rate, n_fft, n_mels).numpy(), ref.T, atol=1e-7)


def test_log_mel_matches_whisper_feature_extractor(fsdd):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor()  # 16 kHz, 25 ms windows, 10 ms hop, 80 mels
    waves = [read_audio(fsdd / name, 16000) for name in ("3_theo_7.wav", "8_jackson_0.wav")]
    for w in waves:
        ref = fe(w.numpy(), sampling_rate=16000, return_tensors="np",
                 padding="longest").input_features[0]
        ours = log_mel(w, mel_filters(16000, 400, 80), 400, 160)
        assert ours.shape == ref.shape
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)


def test_volume_shifts_log_mel_and_normalised_frames_not_at_all(fsdd):
    w = read_audio(fsdd / "5_lucas_3.wav", 8000)
    filters = mel_filters(8000, 200, 40)
    # log10(a^2 P) / 4 = log10(P) / 4 + log10(a) / 2, and the floor moves with the peak (as
    # long as it stays above the absolute floor 1e-10, -100 dB)
    for a in (0.5, 3.0):
        shift = log_mel(a * w, filters, 200, 80) - log_mel(w, filters, 200, 80)
        torch.testing.assert_close(shift, torch.full_like(shift, np.log10(a) / 2), atol=1e-4,
                                   rtol=0)
    for normalize in ("gain", "utterance"):
        task = SpeechTask(SpeechConfig(sample_rate=8000, n_fft=200, hop=80, n_mels=40,
                                       normalize=normalize))
        loud, n = task.features([w])
        quiet, _ = task.features([0.5 * w])
        torch.testing.assert_close(quiet, loud, atol=1e-3, rtol=0)
        assert n.tolist() == [len(w) // 80]
        frames = loud[0, :n[0]]
        if normalize == "gain":  # one mean and std for the whole utterance: 0 and 1
            assert abs(frames.mean()) < 1e-4 and abs(frames.std(unbiased=False) - 1) < 1e-3
        else:  # each mel bin 0 and 1 over the frames
            torch.testing.assert_close(frames.mean(0), torch.zeros(40), atol=1e-4, rtol=0)


def test_filter_augment_is_a_piecewise_linear_gain_within_its_range():
    task = SpeechTask(SpeechConfig(sample_rate=8000, n_fft=200, hop=80, n_mels=40,
                                   filter_db=12))
    curves = task.filter_augment(300, torch.Generator().manual_seed(0))
    assert curves.shape == (300, 40) and curves.abs().max() <= 12 / 40 + 1e-6  # 1 dB = 1/40
    assert curves.abs().max() > 0.9 * 12 / 40 and curves.std(1).mean() > 0.02
    # linear between at most 4 interior knots: each bends the curve at two bins at most
    bends = (curves.diff(n=2, dim=1).abs() > 1e-6).sum(1)
    assert bends.max() <= 8 and bends.min() >= 1


def test_audio_of_any_rate_depth_and_channels_becomes_mono_at_the_model_rate(tmp_path, fsdd):
    w8, rate = sf.read(fsdd / "2_george_9.wav", dtype="float32")
    assert rate == 8000
    stereo = np.stack([w8, 0.5 * w8], axis=1)
    sf.write(tmp_path / "stereo24.wav", resample(stereo[:, 0], 8000, 44100)[:, None]
             .repeat(2, axis=1), 44100, subtype="PCM_24")
    sf.write(tmp_path / "stereo.flac", stereo, 8000)
    mono = read_audio(tmp_path / "stereo.flac", 8000)
    np.testing.assert_allclose(mono.numpy(), 0.75 * w8, atol=2e-4)  # FLAC is 16-bit
    back = read_audio(tmp_path / "stereo24.wav", 8000)  # 44.1 kHz 24-bit -> 8 kHz
    assert abs(len(back) - len(w8)) <= 1
    n = min(len(back), len(w8))
    assert np.corrcoef(back[:n].numpy(), w8[:n])[0, 1] > 0.99
    from scipy.signal import resample_poly
    np.testing.assert_allclose(resample(w8, 8000, 16000), resample_poly(w8, 2, 1), atol=1e-6)


# ---- text and metrics ---------------------------------------------------------------------

def test_error_rates_match_jiwer():
    import jiwer

    rng = np.random.default_rng(0)
    vocab = ["zero", "one", "two", "three", "four", "seven", "eight"]
    refs = [" ".join(rng.choice(vocab, rng.integers(1, 6))) for _ in range(40)]
    hyps = []
    for r in refs:
        words = r.split()
        words = [w if rng.random() < 0.7 else rng.choice(vocab) for w in words
                 if rng.random() > 0.1]
        if rng.random() < 0.2:
            words.insert(int(rng.integers(0, len(words) + 1)), rng.choice(vocab))
        hyps.append(" ".join(words) or "one")
    ours = error_rates(refs, hyps)
    assert ours["wer"] == pytest.approx(jiwer.wer(refs, hyps), abs=1e-12)
    assert ours["cer"] == pytest.approx(jiwer.cer(refs, hyps), abs=1e-12)
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance([], ["a", "b"]) == 2


def test_the_compiled_edit_distance_equals_the_table_written_out():
    rng = np.random.default_rng(1)
    for _ in range(200):
        ref = list(rng.choice(["a", "b", "c", "dd"], rng.integers(0, 30)))
        hyp = list(rng.choice(["a", "b", "c", "e"], rng.integers(0, 30)))
        assert edit_distance(ref, hyp) == edit_distance_reference(ref, hyp)
        assert edit_distance("".join(ref), "".join(hyp)) == \
            edit_distance_reference("".join(ref), "".join(hyp))


def test_text_is_normalised_for_spelling_and_scoring():
    assert normalize_text("  Hello,   World! It’s 9 o'clock.") == "hello world it's 9 o'clock"


def test_subtitles_are_numbered_timed_cues():
    words = [{"word": w, "start": i * 0.5, "end": i * 0.5 + 0.4}
             for i, w in enumerate("one two three".split())]
    assert to_srt(words) == "1\n00:00:00,000 --> 00:00:01,400\none two three\n\n"
    long = [{"word": "seven", "start": i * 2.0, "end": i * 2.0 + 1.5} for i in range(4)]
    srt = to_srt(long)
    assert srt.count("-->") == 2 and "\n2\n00:00:06,000 --> 00:00:07,500\nseven\n" not in srt
    assert srt.startswith("1\n00:00:00,000 --> 00:00:03,500\nseven seven\n")


# ---- data the way users have it -----------------------------------------------------------

def _fsdd_subset(fsdd, speakers=("george", "jackson"), digits=(1, 2, 3), index=range(0, 12)):
    return [fsdd / f"{d}_{s}_{i}.wav" for s in speakers for d in digits for i in index]


def test_fsdd_split_and_a_held_out_speaker(fsdd):
    from monotile.modalities.speech_io import split_utterances
    splits = split_utterances(SpeechConfig(), fsdd)
    assert len(splits["train"]) == 2700 and len(splits["test"]) == 300
    assert {u.text for u in splits["test"]} == {"zero", "one", "two", "three", "four", "five",
                                                "six", "seven", "eight", "nine"}
    held = split_utterances(SpeechConfig(holdout_speaker="theo"), fsdd)
    assert len(held["test"]) == 500 and {u.speaker for u in held["test"]} == {"theo"}
    assert "theo" not in {u.speaker for u in held["train"]} and len(held["train"]) == 2500
    with pytest.raises(monotile.MonotileError, match="speakers: george, jackson"):
        split_utterances(SpeechConfig(holdout_speaker="nobody"), fsdd)


def test_manifest_and_librispeech_folders_list_the_same_recordings(tmp_path, fsdd):
    from monotile.modalities.speech_io import list_utterances

    files = _fsdd_subset(fsdd)
    words = ["zero", "one", "two", "three"]
    manifest = tmp_path / "list.tsv"
    manifest.write_text("path\ttranscript\tspeaker\n" + "".join(
        f"{p}\t{words[int(p.name[0])].upper()}\t{p.stem.split('_')[1]}\n" for p in files))
    root = tmp_path / "libri"
    for p in files:
        d, spk, i = p.stem.split("_")
        chapter = root / spk / d
        chapter.mkdir(parents=True, exist_ok=True)
        uid = f"{spk}-{d}-{int(i):04d}"
        w, rate = sf.read(p)
        sf.write(chapter / f"{uid}.flac", w, rate)
        with open(chapter / f"{spk}-{d}.trans.txt", "a") as f:
            f.write(f"{uid} {words[int(d)].upper()}\n")
    a, _ = list_utterances(SpeechConfig(), manifest)
    b, _ = list_utterances(SpeechConfig(), root)
    key = lambda u: (u.speaker, u.text.lower(),
                     u.path.stem.split("_")[-1].split("-")[-1].lstrip("0"))
    assert sorted(map(key, a)) == sorted(map(key, b)) and len(a) == len(files)


# ---- training, decoding, the CLI ----------------------------------------------------------

def test_fsdd_model_learns_and_transcribes_real_recordings(speech_run, fsdd, tmp_path):
    figures = speech_run.evaluate()
    assert figures["test_utterances"] == 300
    # guessing spells nothing right (WER 1, CER about 0.9); 300 steps spell a third right
    assert figures["wer"] < 0.85 and figures["cer"] < 0.5, figures
    result = speech_run.predict([fsdd / "7_nicolas_2.wav", fsdd / "4_yweweler_1.wav"])
    words = [p["words"] for p in result["predictions"]]
    for w, p in zip(words, result["predictions"]):
        assert p["text"] == " ".join(x["word"] for x in w)
        assert all(0 <= x["start"] < x["end"] <= p["duration"] + 0.02 for x in w)


def test_training_loss_is_pytorchs_ctc_and_equals_the_reference_with_its_gradient(speech_run):
    import dataclasses
    task, model = speech_run.task, speech_run.model
    assert task.config.ctc == "pytorch"
    batch = next(task.batches("train", torch.Generator().manual_seed(0), 8))
    losses, grads = [], []
    for kernel in ("pytorch", "reference"):
        task.config = dataclasses.replace(task.config, ctc=kernel)
        model.zero_grad()
        loss = task.loss(model, batch)
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()
                                if p.grad is not None]))
    task.config = dataclasses.replace(task.config, ctc="pytorch")
    model.zero_grad()
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)
    with pytest.raises(ConfigError, match="ctc=.*choose pytorch or reference"):
        monotile.modalities.speech.SpeechConfig(ctc="fast")


def test_closed_vocabulary_beam_search_spells_only_known_words(speech_run, fsdd):
    files = _fsdd_subset(fsdd, speakers=("lucas",), digits=range(10), index=range(0, 3))
    result = speech_run.predict(files, method="beam", beam_width=8,
                                words=["zero", "one", "two", "three", "four", "five", "six",
                                       "seven", "eight", "nine"])
    texts = [p["text"] for p in result["predictions"]]
    assert all(t in set(speech_run.task.config.words) for t in texts)


def test_silence_and_empty_files_give_an_empty_transcript(speech_run, tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(8000, dtype=np.float32), 8000)
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 8000)
    result = speech_run.predict([tmp_path / "silent.wav", tmp_path / "empty.wav"])
    assert [p["text"] for p in result["predictions"]] == ["", ""]
    assert [p["words"] for p in result["predictions"]] == [[], []]


def test_long_audio_is_transcribed_in_chunks(speech_run, fsdd, tmp_path):
    cfg = speech_run.task.config
    w = read_audio(fsdd / "6_george_1.wav", cfg.sample_rate).numpy()
    gap = np.zeros(int(cfg.sample_rate * (cfg.max_seconds - 0.2)), dtype=np.float32)
    sf.write(tmp_path / "long.wav", np.concatenate([w, gap, w]), cfg.sample_rate)
    pred = speech_run.predict([tmp_path / "long.wav"])["predictions"][0]
    assert pred["duration"] > cfg.max_seconds
    starts = [x["start"] for x in pred["words"]]
    assert starts == sorted(starts)
    assert any(s > cfg.max_seconds - 0.3 for s in starts), pred  # the second digit, in chunk 2


def test_cli_predict_formats_and_eval(speech_run, fsdd, tmp_path):
    files = [str(fsdd / "9_theo_0.wav"), str(fsdd / "0_george_3.wav")]
    out = cli("predict", str(speech_run.dir), *files, "--format", "json")
    assert out.returncode == 0, out.stderr
    preds = json.loads(out.stdout)["predictions"]
    assert [p["path"] for p in preds] == files
    srt = cli("predict", str(speech_run.dir), files[0], "--format", "srt")
    assert srt.returncode == 0 and (srt.stdout == "" or "-->" in srt.stdout)
    text = cli("predict", str(speech_run.dir), files[0], "--beam", "4", "--words",
               "zero,one,two,three,four,five,six,seven,eight,nine", "--output",
               str(tmp_path / "t.csv"))
    assert text.returncode == 0, text.stderr
    assert text.stdout.strip() in speech_run.task.config.words
    assert (tmp_path / "t.csv").read_text().startswith("path,text,duration")
    ev = cli("eval", str(speech_run.dir), "--json")
    assert ev.returncode == 0, ev.stderr
    figures = json.loads(ev.stdout)
    assert set(figures["per_class"]) == set(speech_run.task.config.words)
    assert (speech_run.dir / "plots" / "confusion.png").exists()
    # other recordings, listed in a manifest: every one of them is scored
    manifest = tmp_path / "other.csv"
    manifest.write_text("".join(f"{p},{FSDD_WORDS[int(p.name[0])]}\n"
                                for p in _fsdd_subset(fsdd, ("lucas",), (5, 6), range(40, 43))))
    other = cli("eval", str(speech_run.dir), "--data", str(manifest), "--json")
    assert other.returncode == 0, other.stderr
    figures = json.loads(other.stdout)
    assert figures["test_utterances"] == 6 and set(figures["per_class"]) == {"five", "six"}


def test_train_on_a_manifest_with_a_held_out_speaker(tmp_path, fsdd):
    files = _fsdd_subset(fsdd, speakers=("george", "jackson", "theo"), digits=(0, 1),
                         index=range(0, 8))
    words = ["zero", "one"]
    manifest = tmp_path / "list.csv"
    manifest.write_text("".join(f"{p},{words[int(p.name[0])]},{p.stem.split('_')[1]}\n"
                                for p in files))
    out = cli("train", "speech", "--data", str(manifest), "--holdout-speaker", "theo",
              "--out", str(tmp_path / "run"), "--json",
              *set_args(dict(TINY, max_steps="4", eval_interval="4", sample_rate="8000",
                             n_fft="200", hop="80", n_mels="40", noise_snr="20,35")))
    assert out.returncode == 0, out.stderr
    figures = json.loads(out.stdout)
    assert figures["test_utterances"] == 16
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())["speech"]
    assert cfg["alphabet"] == "enorz" and cfg["words"] == ["one", "zero"]
    assert cfg["noise_snr"] == [20.0, 35.0]


# ---- bad input: one line, exit 2, nothing lost --------------------------------------------

def test_bad_audio_input_is_refused_or_skipped(speech_run, fsdd, tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio")
    good = fsdd / "1_jackson_0.wav"
    (tmp_path / "cut.wav").write_bytes(good.read_bytes()[:30])  # a corrupt header
    for bad in ("notes.wav", "cut.wav"):
        out = cli("predict", str(speech_run.dir), str(tmp_path / bad))
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert "not a readable audio file" in out.stderr
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "notes.wav").write_text("this is not audio")
    (folder / "good.wav").write_bytes(good.read_bytes())
    out = cli("predict", str(speech_run.dir), str(folder))
    assert out.returncode == 0 and "skipped" in out.stderr and "good.wav" in out.stdout
    empty = tmp_path / "nothing"
    empty.mkdir()
    out = cli("predict", str(speech_run.dir), str(empty))
    assert out.returncode == 2 and "has no audio files" in out.stderr
    before = sorted(p.name for p in speech_run.dir.iterdir())
    out = cli("train", "speech", "--preset", "fsdd", "--holdout-speaker", "nobody",
              "--out", str(tmp_path / "r"))
    assert out.returncode == 2 and "speakers:" in out.stderr and not (tmp_path / "r").exists()
    bad_manifest = tmp_path / "m.csv"
    bad_manifest.write_text("missing.wav,one\n")
    out = cli("train", "speech", "--data", str(bad_manifest), "--out", str(tmp_path / "r2"))
    assert out.returncode == 2 and "does not exist" in out.stderr
    assert sorted(p.name for p in speech_run.dir.iterdir()) == before
