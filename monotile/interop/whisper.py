"""Whisper checkpoints in and out of Hugging Face's layout (WhisperForConditionalGeneration):
config.json, model.safetensors, tokenizer.json, and where present generation_config.json (the
decoding prompt's tokens, what to suppress) and preprocessor_config.json (the log-mel settings).

    monotile import hf WHISPER_DIR --out RUN      monotile export hf RUN --out DIR

The names and layouts differ; the numbers do not:
- q_proj, k_proj, v_proj of the self-attention are one fused qkv here (rows q | k | v); the
  cross-attention's (encoder_attn) q_proj is our q and its k_proj, v_proj one fused kv (k | v).
- Whisper's k_proj has no bias: the fused bias holds zeros there, and export refuses a run
  whose k bias is not zero.
- conv1 and conv2 are the stem's convs.0 and convs.2; embed_positions are the trunks' positions
  (the encoder's are Whisper's fixed sinusoids, imported as stored).
- proj_out is embed_tokens (tied): our head is tok_emb.
Settings the model here does not have (scale_embedding, another activation, a weighted layer
sum, an untied head, another architecture) are refused by name before anything is written.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from .. import __version__
from ..core.transformer import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..modalities.whisper import TranscribeConfig, TranscribeTask
from ..train.checkpoint import atomic_write_json, save_tensors
from ..train.trainer import TrainConfig
from .hf import _take

ARCHITECTURES = ("WhisperForConditionalGeneration", "WhisperModel")
LAYER = (("norm1", "self_attn_layer_norm"), ("attn.wo", "self_attn.out_proj"),
         ("norm2", "final_layer_norm"), ("mlp.fc1", "fc1"), ("mlp.fc2", "fc2"))
CROSS = (("norm_cross", "encoder_attn_layer_norm"), ("cross_attn.wo", "encoder_attn.out_proj"),
         ("cross_attn.q", "encoder_attn.q_proj"))


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def whisper_configs(config: dict, src: Path, tokenizer) -> tuple[ModelConfig, TranscribeConfig]:
    """The decoder's ModelConfig and the TranscribeConfig (features, encoder, prompt tokens)
    of a Whisper folder, refusing what the model here does not run."""
    for key, ok in (("scale_embedding", False), ("use_weighted_layer_sum", False),
                    ("tie_word_embeddings", True)):
        if config.get(key, ok) != ok:
            raise ConfigError(f"Whisper setting {key}={json.dumps(config[key])} is not "
                              f"supported (only {json.dumps(ok)}); this checkpoint cannot be "
                              "imported")
    if config.get("activation_function", "gelu") != "gelu":
        raise ConfigError(f"Whisper setting activation_function="
                          f"{config['activation_function']!r} is not supported (only 'gelu')")
    other = [a for a in config.get("architectures") or [] if a not in ARCHITECTURES]
    if other:
        raise ConfigError(f"architectures={other} is not supported; import takes "
                          "WhisperForConditionalGeneration (speech to text)")
    d = config["d_model"]
    for key in ("encoder_attention_heads", "decoder_attention_heads"):
        if d % config[key]:
            raise ConfigError(f"{key}={config[key]} does not divide d_model={d}")
    pre = _json(src / "preprocessor_config.json")
    gen = _json(src / "generation_config.json")
    n_mels = int(config.get("num_mel_bins", 80))
    if pre.get("feature_size", n_mels) != n_mels:
        raise ConfigError(f"preprocessor_config.json's feature_size={pre['feature_size']} "
                          f"differs from config.json's num_mel_bins={n_mels}")
    rate, hop = int(pre.get("sampling_rate", 16000)), int(pre.get("hop_length", 160))
    source = int(config.get("max_source_positions", 1500))
    if "chunk_length" in pre and pre["chunk_length"] * rate != 2 * source * hop:
        raise ConfigError(f"preprocessor_config.json's chunk_length={pre['chunk_length']} s "
                          f"is not the encoder's window of {2 * source} frames of {hop} "
                          f"samples at {rate} Hz")

    def special(name: str, gen_value=None):
        return gen_value if gen_value is not None else tokenizer.token_to_id(name)

    multilingual = gen.get("is_multilingual",
                           tokenizer.token_to_id("<|en|>") is not None)
    start = special("<|startoftranscript|>", gen.get("decoder_start_token_id",
                                                     config.get("decoder_start_token_id")))
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos = special("<|endoftext|>", eos[0] if isinstance(eos, list) else eos)
    no_ts = special("<|notimestamps|>", gen.get("no_timestamps_token_id"))
    language = task = None
    if multilingual:
        language = special("<|en|>", (gen.get("lang_to_id") or {}).get("<|en|>"))
        task = special("<|transcribe|>", (gen.get("task_to_id") or {}).get("transcribe"))
        if language is None or task is None:
            raise ConfigError("this multilingual Whisper has no <|en|> or <|transcribe|> token "
                              "(tokenizer.json, generation_config.json); it cannot be prompted")
    if start is None or eos is None:
        raise ConfigError("neither generation_config.json nor tokenizer.json names "
                          "<|startoftranscript|> and <|endoftext|>; save the Whisper "
                          "tokenizer beside the weights and import again")
    V = config["vocab_size"]
    ids = {"decoder_start_token_id": start, "eos_token_id": eos, "<|en|>": language,
           "<|transcribe|>": task, "no_timestamps_token_id": no_ts}
    for name, i in ids.items():
        if i is not None and not 0 <= i < V:
            raise ConfigError(f"{name}={i} is outside the vocabulary of {V} tokens")
    if no_ts is not None and no_ts <= eos:
        raise ConfigError(f"no_timestamps_token_id={no_ts} is not after <|endoftext|>={eos}; "
                          "Whisper's layout is text, then special tokens, then timestamps")
    suppress = gen.get("suppress_tokens", config.get("suppress_tokens")) or ()
    begin = gen.get("begin_suppress_tokens", config.get("begin_suppress_tokens")) or ()
    target = int(config.get("max_target_positions", 448))
    decoder = ModelConfig(
        vocab_size=V, n_layer=config["decoder_layers"],
        n_head=config["decoder_attention_heads"], d_model=d, d_ff=config["decoder_ffn_dim"],
        context=target, norm="layernorm", norm_eps=1e-5, mlp="gelu", positions="learned",
        bias=True, tie_embeddings=True, cross_attention=True)
    task_cfg = TranscribeConfig(
        sample_rate=rate, n_fft=int(pre.get("n_fft", 400)), hop=hop, n_mels=n_mels,
        source_positions=source, encoder_layers=config["encoder_layers"],
        encoder_heads=config["encoder_attention_heads"], encoder_ffn=config["encoder_ffn_dim"],
        start_id=start, language_id=language, task_id=task, no_timestamps_id=no_ts,
        eos_id=eos, suppress=tuple(suppress), begin_suppress=tuple(begin),
        max_initial_timestamp=gen.get("max_initial_timestamp_index"),
        timestamps=no_ts is not None, max_new_tokens=max(1, target // 2))
    return decoder, task_cfg


# ---- weights in and out ------------------------------------------------------------------------

def whisper_in(cfg: ModelConfig, task: TranscribeConfig, tensors: dict) -> dict:
    """Hugging Face's Whisper tensors -> WhisperModel's state dict."""
    t = dict(tensors)
    p = "model." if any(k.startswith("model.") for k in t) else ""
    d, out = cfg.d_model, {}
    e = f"{p}encoder."
    out["stem.convs.0.weight"] = _take(t, e + "conv1.weight", (d, task.n_mels, 3))
    out["stem.convs.0.bias"] = _take(t, e + "conv1.bias", (d,))
    out["stem.convs.2.weight"] = _take(t, e + "conv2.weight", (d, d, 3))
    out["stem.convs.2.bias"] = _take(t, e + "conv2.bias", (d,))
    out["encoder.pos_emb"] = _take(t, e + "embed_positions.weight", (task.source_positions, d))
    trunks = (("encoder", e, task.encoder_layers, task.encoder_ffn, False),
              ("decoder", f"{p}decoder.", cfg.n_layer, cfg.hidden, True))
    for ours, theirs, layers, ffn, cross in trunks:
        for i in range(layers):
            h, b = f"{theirs}layers.{i}.", f"{ours}.blocks.{i}."
            qkv = [_take(t, h + f"self_attn.{x}_proj.weight", (d, d)) for x in "qkv"]
            out[b + "attn.qkv.weight"] = torch.cat(qkv)
            out[b + "attn.qkv.bias"] = torch.cat([
                _take(t, h + "self_attn.q_proj.bias", (d,)), torch.zeros(d),  # k has no bias
                _take(t, h + "self_attn.v_proj.bias", (d,))])
            pairs = LAYER + (CROSS if cross else ())
            for mine, hf in pairs:
                shape = {"mlp.fc1": (ffn, d), "mlp.fc2": (d, ffn)}.get(mine, (d, d))
                if "norm" in mine:
                    shape = (d,)
                out[b + f"{mine}.weight"] = _take(t, h + f"{hf}.weight", shape)
                out[b + f"{mine}.bias"] = _take(t, h + f"{hf}.bias", (shape[0],))
            if cross:
                out[b + "cross_attn.kv.weight"] = torch.cat(
                    [_take(t, h + f"encoder_attn.{x}_proj.weight", (d, d)) for x in "kv"])
                out[b + "cross_attn.kv.bias"] = torch.cat(
                    [torch.zeros(d), _take(t, h + "encoder_attn.v_proj.bias", (d,))])
        out[f"{ours}.norm.weight"] = _take(t, theirs + "layer_norm.weight", (d,))
        out[f"{ours}.norm.bias"] = _take(t, theirs + "layer_norm.bias", (d,))
    out["tok_emb.weight"] = _take(t, f"{p}decoder.embed_tokens.weight", (cfg.vocab_size, d))
    out["decoder.pos_emb"] = _take(t, f"{p}decoder.embed_positions.weight", (cfg.context, d))
    head = t.pop("proj_out.weight", None)
    if head is not None and not torch.equal(head.float(), out["tok_emb.weight"]):
        raise CheckpointError("tensor 'proj_out.weight' differs from the token embedding; "
                              "Whisper's output projection is tied to it (untied heads are "
                              "not supported)")
    out["head.weight"] = out["tok_emb.weight"]
    if t:
        raise CheckpointError(f"unexpected tensor {sorted(t)[0]!r} in the checkpoint; this "
                              "model has parts the Whisper here does not, so it is not imported")
    return out


def whisper_out(cfg: ModelConfig, task: TranscribeConfig, sd: dict) -> dict:
    """WhisperModel's state dict -> WhisperForConditionalGeneration's tensors (proj_out tied,
    so left out as transformers saves it)."""
    d, p, out = cfg.d_model, "model.", {}
    e = f"{p}encoder."
    out[e + "conv1.weight"], out[e + "conv1.bias"] = sd["stem.convs.0.weight"], \
        sd["stem.convs.0.bias"]
    out[e + "conv2.weight"], out[e + "conv2.bias"] = sd["stem.convs.2.weight"], \
        sd["stem.convs.2.bias"]
    out[e + "embed_positions.weight"] = sd["encoder.pos_emb"]
    trunks = (("encoder", e, task.encoder_layers, False),
              ("decoder", f"{p}decoder.", cfg.n_layer, True))
    for ours, theirs, layers, cross in trunks:
        for i in range(layers):
            h, b = f"{theirs}layers.{i}.", f"{ours}.blocks.{i}."
            qb, kb, vb = sd[b + "attn.qkv.bias"].split(d)
            biases = [(f"{b}attn.qkv.bias", kb)]
            for x, w in zip("qkv", sd[b + "attn.qkv.weight"].split(d)):
                out[h + f"self_attn.{x}_proj.weight"] = w
            out[h + "self_attn.q_proj.bias"], out[h + "self_attn.v_proj.bias"] = qb, vb
            for mine, hf in LAYER + (CROSS if cross else ()):
                out[h + f"{hf}.weight"] = sd[b + f"{mine}.weight"]
                out[h + f"{hf}.bias"] = sd[b + f"{mine}.bias"]
            if cross:
                kb, vb = sd[b + "cross_attn.kv.bias"].split(d)
                biases.append((f"{b}cross_attn.kv.bias", kb))
                for x, w in zip("kv", sd[b + "cross_attn.kv.weight"].split(d)):
                    out[h + f"encoder_attn.{x}_proj.weight"] = w
                out[h + "encoder_attn.v_proj.bias"] = vb
            for name, k_bias in biases:
                if k_bias.abs().max() > 0:
                    raise ConfigError(f"{name}'s k part is not zero; Whisper's k_proj has no "
                                      "bias, so transformers cannot hold this model")
        out[theirs + "layer_norm.weight"] = sd[f"{ours}.norm.weight"]
        out[theirs + "layer_norm.bias"] = sd[f"{ours}.norm.bias"]
    out[f"{p}decoder.embed_tokens.weight"] = sd["tok_emb.weight"]
    out[f"{p}decoder.embed_positions.weight"] = sd["decoder.pos_emb"]
    return out


# ---- the run -------------------------------------------------------------------------------

def import_whisper(src: Path, config: dict, tensors: dict, out) -> Path:
    """A transcribe run from a Whisper folder: every check, then the run directory."""
    from tokenizers import Tokenizer as HFTokenizer

    from ..run import _config_json, _new_run_dir, write_weights_run
    tok_path = src / "tokenizer.json"
    if not tok_path.is_file():
        raise CheckpointError(f"{src} has no tokenizer.json; save Whisper's tokenizer beside "
                              "the weights (WhisperTokenizerFast.from_pretrained(...)"
                              ".save_pretrained(DIR)) and import again")
    tokenizer = HFTokenizer.from_file(str(tok_path))
    cfg, task_cfg = whisper_configs(config, src, tokenizer)
    if tokenizer.get_vocab_size() > cfg.vocab_size:
        raise CheckpointError(f"the tokenizer has {tokenizer.get_vocab_size()} tokens but the "
                              f"model only {cfg.vocab_size}; they do not belong together")
    weights = whisper_in(cfg, task_cfg, tensors)
    model = TranscribeTask(task_cfg).build_model(cfg)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"the converted weights do not fit the model: {e}") from None
    out = _new_run_dir(out, src.name)  # refused now if it holds a run
    meta = {"monotile_version": __version__, "task": "transcribe", "preset": None}
    doc = {**_config_json(meta, {"model": cfg, "train": TrainConfig(),
                                 "transcribe": task_cfg}),
           "imported": {"from": str(src.resolve()), "model_type": "whisper"}}
    write_weights_run(out, doc, model, tok_path)
    if (src / "generation_config.json").is_file():  # its language table, kept for export
        shutil.copyfile(src / "generation_config.json", out / "generation_config.json")
    return out


def export_whisper(run, out: Path) -> Path:
    """A WhisperForConditionalGeneration folder from a transcribe run."""
    cfg, task = run.configs["model"], run.configs["transcribe"]
    shaped = (cfg.norm == "layernorm" and cfg.norm_eps == 1e-5 and cfg.mlp == "gelu"
              and cfg.positions == "learned" and cfg.bias and cfg.qkv_bias in (None, True)
              and cfg.kv_heads == cfg.n_head and cfg.norm_position == "pre"
              and cfg.cross_attention and cfg.d_model % task.encoder_heads == 0)
    if not shaped:
        raise ConfigError(f"{run.dir}'s model is not Whisper-shaped (pre-norm LayerNorm "
                          "blocks with GELU, biases and learned positions); transformers' "
                          "Whisper cannot hold it")
    sd = {k: v.detach().float() for k, v in run.model.state_dict().items()}
    tensors = whisper_out(cfg, task, sd)  # refuses a non-zero k bias, before writing
    eos = task.eos_id
    hf_config = {
        "model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": cfg.vocab_size, "num_mel_bins": task.n_mels, "d_model": cfg.d_model,
        "encoder_layers": task.encoder_layers, "encoder_attention_heads": task.encoder_heads,
        "encoder_ffn_dim": task.encoder_ffn, "decoder_layers": cfg.n_layer,
        "decoder_attention_heads": cfg.n_head, "decoder_ffn_dim": cfg.hidden,
        "max_source_positions": task.source_positions, "max_target_positions": cfg.context,
        "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
        "decoder_start_token_id": task.start_id, "eos_token_id": eos, "bos_token_id": eos,
        "pad_token_id": eos, "suppress_tokens": list(task.suppress),
        "begin_suppress_tokens": list(task.begin_suppress), "dropout": 0.0,
        "attention_dropout": 0.0, "activation_dropout": 0.0, "use_cache": True,
        "is_encoder_decoder": True}
    generation = _json(run.dir / "generation_config.json")
    generation.update({
        "decoder_start_token_id": task.start_id, "eos_token_id": eos, "bos_token_id": eos,
        "pad_token_id": eos, "suppress_tokens": list(task.suppress),
        "begin_suppress_tokens": list(task.begin_suppress),
        "is_multilingual": task.language_id is not None})
    if task.no_timestamps_id is not None:
        generation["no_timestamps_token_id"] = task.no_timestamps_id
    if task.max_initial_timestamp is not None:
        generation["max_initial_timestamp_index"] = task.max_initial_timestamp
    if task.language_id is not None:
        generation["lang_to_id"] = {**generation.get("lang_to_id", {}),
                                    "<|en|>": task.language_id}
        generation["task_to_id"] = {**generation.get("task_to_id", {}),
                                    "transcribe": task.task_id}
    processor = {"feature_extractor_type": "WhisperFeatureExtractor",
                 "feature_size": task.n_mels, "sampling_rate": task.sample_rate,
                 "hop_length": task.hop, "n_fft": task.n_fft,
                 "chunk_length": round(task.window_seconds),
                 "n_samples": task.frames * task.hop, "nb_max_frames": task.frames,
                 "padding_side": "right", "padding_value": 0.0,
                 "return_attention_mask": False, "processor_class": "WhisperProcessor"}
    out.mkdir(parents=True, exist_ok=True)  # every check has passed
    atomic_write_json(out / "config.json", {**hf_config, "torch_dtype": "float32"})
    atomic_write_json(out / "generation_config.json", generation)
    atomic_write_json(out / "preprocessor_config.json", processor)
    save_tensors(out / "model.safetensors", {k: v.contiguous() for k, v in tensors.items()},
                 {"format": "pt"})
    shutil.copyfile(run.dir / "tokenizer.json", out / "tokenizer.json")
    return out
