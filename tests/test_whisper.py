"""Encoder-decoder: cross-attention on the trunk, and Whisper checkpoints through it. A small
random WhisperForConditionalGeneration built offline with transformers gives the same logits
and the same greedy and beam-search tokens (with and without timestamps), transcribes files
from the command line, and exports back."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from tokenizers import AddedToken, Tokenizer
from torch import nn

import monotile
from monotile.core.attention import SelfAttention
from monotile.core.transformer import ModelConfig, Transformer
from monotile.data import find_data
from monotile.errors import ConfigError, MonotileError
from monotile.modalities.audio import read_audio
from monotile.modalities.whisper import sinusoids
from monotile.modalities.whisper_decode import TokenRules, beam_decode, greedy_decode
from monotile.tokenizers import Tokenizer as BPE

from conftest import cli

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|translate|>",
            "<|transcribe|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>"]
TIMESTAMPS = [f"<|{i * 0.02:.2f}|>" for i in range(1501)]  # <|0.00|> ... <|30.00|>


# ---- cross-attention on the trunk ----------------------------------------------------------

def test_cross_attention_equals_torch_multihead_attention_over_the_memory():
    torch.manual_seed(0)
    d, H = 32, 4
    ours = SelfAttention(d, H, H, bias=True, cross=True).eval()
    ref = nn.MultiheadAttention(d, H, bias=True, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q.weight, ours.kv.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q.bias, ours.kv.bias]))
        ref.out_proj.weight.copy_(ours.wo.weight)
        ref.out_proj.bias.copy_(ours.wo.bias)
    x, memory = torch.randn(2, 5, d), torch.randn(2, 9, d)  # 5 queries over 9 memory positions
    with torch.no_grad():
        expected = ref(x, memory, memory, need_weights=False)[0]
        torch.testing.assert_close(ours(x, memory=memory), expected, atol=1e-5, rtol=1e-5)
        weights = ours.state_dict()  # the same weights through the written-out attention
        ours = SelfAttention(d, H, H, bias=True, cross=True, impl="math").eval()
        ours.load_state_dict(weights)
        torch.testing.assert_close(ours(x, memory=memory), expected, atol=1e-5, rtol=1e-5)


def test_decoding_with_cached_cross_keys_equals_full_recompute():
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=4, d_model=32, context=16, cross_attention=True)
    decoder = Transformer(cfg).eval()
    x, memory = torch.randn(2, 7, 32), torch.randn(2, 11, 32)
    with torch.no_grad():
        full = decoder(x, causal=True, memory=memory)
        cache, cross = decoder.make_cache(2, 16), decoder.make_cross_cache(2, 11)
        steps = [decoder(x[:, :3], memory=memory, cache=cache, cross_cache=cross)]
        for t in range(3, 7):  # later steps read the memory's keys from the cache
            steps.append(decoder(x[:, t:t + 1], cache=cache, cross_cache=cross, pos=t))
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(decoder(x, memory=torch.randn(2, 11, 32)), full)  # it reads it


def test_a_trunk_without_cross_attention_has_no_cross_weights_and_refuses_memory():
    plain = Transformer(ModelConfig(n_layer=2, d_model=32))
    assert not any("cross" in name for name in plain.state_dict())
    with pytest.raises(ValueError, match="no cross-attention"):
        plain(torch.randn(1, 4, 32), memory=torch.randn(1, 6, 32))
    cross = Transformer(ModelConfig(n_layer=2, d_model=32, cross_attention=True))
    extra = {n for n in cross.state_dict()} - {n for n in plain.state_dict()}
    assert extra == {f"blocks.{i}.{part}" for i in range(2) for part in (
        "norm_cross.weight", "norm_cross.bias", "cross_attn.q.weight", "cross_attn.q.bias",
        "cross_attn.kv.weight", "cross_attn.kv.bias", "cross_attn.wo.weight",
        "cross_attn.wo.bias")}


# ---- a small Whisper built offline ----------------------------------------------------------

@pytest.fixture(scope="module")
def fsdd():
    return find_data("fsdd/recordings")


@pytest.fixture(scope="module")
def whisper_tokenizer(tmp_path_factory, shakespeare):
    """A byte-level BPE of 300 tokens trained on real text, then Whisper's special tokens and
    its 1501 timestamps, in Whisper's order (text < <|endoftext|> < ... < timestamps)."""
    # monotile's own byte-level BPE trainer (GPT-2's pre-tokenizer and decoder)
    tok = BPE.train_bpe(shakespeare.read_text(encoding="utf-8")[:50_000], 300).tok
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False)
                            for s in SPECIALS + TIMESTAMPS])
    path = tmp_path_factory.mktemp("whisper_tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def build_whisper(folder, tokenizer_json, **settings):
    """A random WhisperForConditionalGeneration (width 64, 2 + 2 layers, 4 heads, 80 mels, 30-s
    windows) over the tokenizer, with its generation and preprocessor configs, saved to folder.
    Weights ~ N(0, 0.2) so that decoding is not one token over and over, and <|endoftext|>'s
    embedding 1.05 times a likely text token's, so that transcripts can end."""
    t = transformers
    tok = Tokenizer.from_file(str(tokenizer_json))
    ids = {s: tok.token_to_id(s) for s in SPECIALS}
    eos = ids["<|endoftext|>"]
    torch.manual_seed(0)
    config = t.WhisperConfig(
        vocab_size=tok.get_vocab_size(), num_mel_bins=80, d_model=64, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=128, decoder_ffn_dim=128, max_source_positions=1500,
        max_target_positions=64, decoder_start_token_id=ids["<|startoftranscript|>"],
        eos_token_id=eos, pad_token_id=eos, bos_token_id=eos, init_std=0.2,
        begin_suppress_tokens=[tok.token_to_id("Ġ"), eos], suppress_tokens=[1, 2, 7],
        **settings)
    hf = t.WhisperForConditionalGeneration(config).eval()
    hf.generation_config = t.GenerationConfig(
        decoder_start_token_id=ids["<|startoftranscript|>"], eos_token_id=eos,
        pad_token_id=eos, bos_token_id=eos, no_timestamps_token_id=ids["<|notimestamps|>"],
        lang_to_id={"<|en|>": ids["<|en|>"]},
        task_to_id={"transcribe": ids["<|transcribe|>"], "translate": ids["<|translate|>"]},
        is_multilingual=True, max_initial_timestamp_index=50, suppress_tokens=[1, 2, 7],
        begin_suppress_tokens=[tok.token_to_id("Ġ"), eos], max_length=64)
    with torch.no_grad():
        prompt = torch.tensor([[ids[s] for s in SPECIALS[1:3] + SPECIALS[4:5]]])
        logits = hf(input_features=torch.zeros(1, 80, 3000), decoder_input_ids=prompt).logits
        likely = int(logits[0, -1, :eos].argmax())
        embed = hf.model.decoder.embed_tokens.weight
        embed[eos] = 1.05 * embed[likely]
    hf.save_pretrained(folder)
    t.WhisperFeatureExtractor(feature_size=80).save_pretrained(folder)
    shutil.copyfile(tokenizer_json, folder / "tokenizer.json")
    return hf


@pytest.fixture(scope="module")
def whisper(tmp_path_factory, whisper_tokenizer):
    """(the transformers model, its folder, the run `monotile import hf` made of it)."""
    root = tmp_path_factory.mktemp("whisper")
    hf = build_whisper(root / "hf", whisper_tokenizer)
    done = cli("import", "hf", str(root / "hf"), "--out", str(root / "run"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["model_type"] == "whisper"
    return hf, root / "hf", root / "run"


def test_log_mel_of_a_window_equals_whisper_feature_extractor(fsdd, whisper):
    fe = transformers.WhisperFeatureExtractor()  # 16 kHz, n_fft 400, hop 160, 80 mels, 30 s
    task = monotile.load(whisper[2]).task
    for name in ("3_theo_7.wav", "8_jackson_0.wav"):
        wave = read_audio(fsdd / name, 16000)  # an 8-kHz recording, resampled
        ref = fe(wave.numpy(), sampling_rate=16000, return_tensors="np").input_features[0]
        ours = task.features(wave)
        assert ours.shape == ref.shape == (80, 3000)  # padded with silence to 30 s
        np.testing.assert_allclose(ours.numpy(), ref, atol=1e-4)
    long = torch.cat([read_audio(fsdd / "3_theo_7.wav", 16000)] * 120)  # ~40 s: cut to 30
    ref = fe(long.numpy(), sampling_rate=16000, return_tensors="np").input_features[0]
    np.testing.assert_allclose(task.features(long).numpy(), ref, atol=1e-4)
    # the encoder's positions are Whisper's fixed sinusoids
    torch.testing.assert_close(whisper[0].model.encoder.embed_positions.weight.detach(),
                               sinusoids(1500, 64))


def hf_tokens(hf, mel, prompt, n, beams, timestamps):
    """transformers' own decoding of one 30-s window: its generate() with its logit processors
    (suppression, timestamp rules), one call, the prompt given, the end token dropped."""
    out = hf.generate(mel, decoder_input_ids=torch.tensor([prompt]), max_new_tokens=n,
                      do_sample=False, num_beams=beams, return_timestamps=timestamps,
                      return_dict_in_generate=True, force_unique_generate_call=True)
    seq = out.sequences[0, len(prompt):].tolist()
    eos = hf.generation_config.eos_token_id
    return seq[:seq.index(eos)] if eos in seq else seq


def test_imported_whisper_gives_transformers_logits_and_greedy_and_beam_tokens(whisper):
    hf, _, run_dir = whisper
    run = monotile.load(run_dir)
    model, c = run.model, run.task.config
    mel = torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(1))
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(2))
    ids[:, 0] = c.start_id
    with torch.no_grad():
        assert (model(mel, ids) - hf(input_features=mel, decoder_input_ids=ids).logits
                ).abs().max() <= 1e-4
    ended = stamped = 0
    for i in range(2):
        with torch.no_grad():
            memory = model.encode(mel[i:i + 1])
        for timestamps in (False, True):
            prompt, rules = c.prompt(timestamps), TokenRules(c, timestamps)
            n = 64 - len(prompt)  # up to the decoder's context
            ours = greedy_decode(model, memory, prompt, rules, n, c.eos_id)
            assert ours == hf_tokens(hf, mel[i:i + 1], prompt, n, 1, timestamps)
            ours_beam = beam_decode(model, memory, prompt, rules, n, c.eos_id, 4)
            assert ours_beam == hf_tokens(hf, mel[i:i + 1], prompt, n, 4, timestamps)
            ended += sum(len(x) < n for x in (ours, ours_beam))
            stamped += timestamps and any(t > c.no_timestamps_id for t in ours + ours_beam)
    assert ended and stamped  # <|endoftext|> and the timestamp rules were both exercised


def test_transcribe_prints_json_and_srt_with_segments_and_windows_long_audio(
        whisper, fsdd, tmp_path):
    run_dir = whisper[2]
    wav = fsdd / "3_theo_7.wav"
    done = cli("predict", str(run_dir), str(wav), "--format", "json")
    assert done.returncode == 0, done.stderr
    [p] = json.loads(done.stdout)["predictions"]  # a random model's words: only the shape
    duration = sf.info(str(wav)).duration
    assert p["path"] == str(wav) and abs(p["duration"] - duration) < 1e-3
    assert isinstance(p["text"], str) and p["segments"]
    for s in p["segments"]:
        assert 0 <= s["start"] <= s["end"] <= p["duration"] and s["text"]
    done = cli("predict", str(run_dir), str(wav), "--format", "srt", "--beam", "2")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("1\n00:00:0") and " --> " in done.stdout
    done = cli("predict", str(run_dir), str(wav), "--words", "one,two")
    assert done.returncode == 2 and "a Whisper run spells freely" in done.stderr

    # 35 s: two windows, the second starting at 30 s; silence is not transcribed
    speech = read_audio(wav, 16000).numpy()
    long = np.zeros(35 * 16000, dtype=np.float32)
    long[:len(speech)] = speech
    long[31 * 16000:31 * 16000 + len(speech)] = speech
    sf.write(tmp_path / "long.wav", long, 16000)
    sf.write(tmp_path / "silence.wav", np.zeros(16000, dtype=np.float32), 16000)
    run = monotile.load(run_dir)
    result = run.predict([str(tmp_path / "long.wav"), str(tmp_path / "silence.wav")],
                         timestamps=False, fallback=False)  # a random model fails every window
    long_p, quiet = result["predictions"]
    assert [(s["start"], s["end"]) for s in long_p["segments"]] == [(0.0, 30.0), (30.0, 35.0)]
    assert quiet["text"] == "" and quiet["segments"] == []
    stamped = run.predict([str(tmp_path / "long.wav")], method="beam", beam_width=2)
    starts = [s["start"] for s in stamped["predictions"][0]["segments"]]
    assert any(t < 30 for t in starts) and any(t >= 30 for t in starts)


def test_whisper_exports_back_to_transformers_with_the_same_logits(whisper, tmp_path):
    hf, _, run_dir = whisper
    done = cli("export", "hf", str(run_dir), "--out", str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    back = transformers.WhisperForConditionalGeneration.from_pretrained(tmp_path / "back")
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([[hf.config.decoder_start_token_id, 5, 17, 42, 99]])
    with torch.no_grad():
        expected = hf(input_features=mel, decoder_input_ids=ids).logits
        assert (back.eval()(input_features=mel, decoder_input_ids=ids).logits - expected
                ).abs().max() <= 1e-4
    assert back.generation_config.no_timestamps_token_id == \
        hf.generation_config.no_timestamps_token_id
    fe = transformers.WhisperFeatureExtractor.from_pretrained(tmp_path / "back")
    assert (fe.feature_size, fe.sampling_rate, fe.n_samples) == (80, 16000, 480000)
    # a k bias transformers' Whisper has no place for is refused, before anything is written
    from monotile.interop.whisper import export_whisper
    run = monotile.load(run_dir)
    with torch.no_grad():
        run.model.decoder.blocks[1].cross_attn.kv.bias[:64] = 0.5
    with pytest.raises(ConfigError, match="decoder.blocks.1.cross_attn.kv.bias's k part"):
        export_whisper(run, tmp_path / "no")
    assert not (tmp_path / "no").exists()


def test_whisper_settings_that_cannot_run_are_refused_by_name_and_nothing_is_written(
        whisper, tmp_path):
    from safetensors.torch import load_file, save_file

    from monotile.interop.hf import import_hf
    src = tmp_path / "hf"
    shutil.copytree(whisper[1], src)
    config = json.loads((src / "config.json").read_text())
    out = tmp_path / "run"

    def refused(message, change=None, command_line=False):
        (src / "config.json").write_text(json.dumps(dict(config, **(change or {}))))
        if command_line:
            done = cli("import", "hf", str(src), "--out", str(out))
            assert done.returncode == 2 and message in done.stderr, done.stderr
            assert len(done.stderr.strip().splitlines()) == 1
        else:
            with pytest.raises(MonotileError, match=re.escape(message)):
                import_hf(src, out)
        assert not out.exists()

    refused("scale_embedding=true is not supported", {"scale_embedding": True}, True)
    refused("activation_function='relu' is not supported", {"activation_function": "relu"},
            True)
    refused("use_weighted_layer_sum=true is not supported", {"use_weighted_layer_sum": True})
    refused("tie_word_embeddings=false is not supported", {"tie_word_embeddings": False})
    refused("architectures=['WhisperForAudioClassification'] is not supported",
            {"architectures": ["WhisperForAudioClassification"]})
    refused("encoder_attention_heads=5 does not divide d_model=64",
            {"encoder_attention_heads": 5})
    tensors = load_file(str(src / "model.safetensors"))
    k_bias = "model.decoder.layers.0.encoder_attn.k_proj.bias"
    save_file(dict(tensors, **{k_bias: torch.zeros(64)}), str(src / "model.safetensors"))
    refused(f"unexpected tensor '{k_bias}'", command_line=True)
    save_file({k: v for k, v in tensors.items() if "decoder.layers.1.fc2" not in k},
              str(src / "model.safetensors"))
    refused("tensor 'model.decoder.layers.1.fc2.weight' is missing")
    save_file(tensors, str(src / "model.safetensors"))
    (src / "tokenizer.json").unlink()
    refused("has no tokenizer.json")
    with pytest.raises(ConfigError, match="import a Whisper checkpoint"):
        monotile.train("transcribe", out=tmp_path / "trained")
    assert not (tmp_path / "trained").exists()


def test_a_served_whisper_transcribes_as_predict_does(whisper, fsdd):
    openai = pytest.importorskip("openai")
    from monotile.serve.process import start_server, stop
    _, _, run_dir = whisper
    wav = fsdd / "3_theo_0.wav"
    expected = monotile.load(run_dir).predict([str(wav)])["predictions"][0]
    proc, url = start_server(f"whisper={run_dir}")
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        with open(wav, "rb") as f:
            answer = client.audio.transcriptions.create(model="whisper", file=f,
                                                        response_format="verbose_json")
        assert answer.text == expected["text"]
        assert len(answer.segments) == max(1, len(expected.get("segments") or []))
    finally:
        stop(proc)
