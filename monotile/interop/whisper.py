"""Whisper (`whisper`, WhisperForConditionalGeneration) as a transcribe run: config.json,
model.safetensors, tokenizer.json, and where present generation_config.json (the decoding
prompt's tokens, what to suppress, the alignment heads and the languages; kept in the run for
export) and preprocessor_config.json (the log-mel settings). A CTranslate2 model (ct2.py) comes
in through the same adapter.

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
from pathlib import Path

from ..core.transformer import ModelConfig
from ..errors import ConfigError
from ..modalities.whisper import TranscribeConfig, TranscribeTask
from .adapter import Adapter, Part, affine, fuse, keys_in, keys_out, lacking, one, tie
from .hf_folder import export_run

ARCHITECTURES = ("WhisperForConditionalGeneration", "WhisperModel")
NO_K_BIAS = lacking("k", ("d",), "Whisper's k_proj has no bias")


def block(stack: str, i: str, ff: str, cross: bool) -> list:
    """One of the `stack`'s (encoder or decoder) blocks, index `i`, MLP width `ff`."""
    b, h = f"{stack}.blocks.{i}.", "{p}" + f"{stack}.layers.{i}."
    rules = [*affine(b + "attn.qkv", [h + f"self_attn.{x}_proj" for x in "qkv"], ("d", "d"),
                     bias=False),
             fuse(b + "attn.qkv.bias", Part(h + "self_attn.q_proj.bias", ("d",)), NO_K_BIAS,
                  Part(h + "self_attn.v_proj.bias", ("d",))),
             *affine(b + "norm1", h + "self_attn_layer_norm", ("d",)),
             *affine(b + "attn.wo", h + "self_attn.out_proj", ("d", "d")),
             *affine(b + "norm2", h + "final_layer_norm", ("d",)),
             *affine(b + "mlp.fc1", h + "fc1", (ff, "d")),
             *affine(b + "mlp.fc2", h + "fc2", ("d", ff))]
    if cross:
        rules += [*affine(b + "norm_cross", h + "encoder_attn_layer_norm", ("d",)),
                  *affine(b + "cross_attn.wo", h + "encoder_attn.out_proj", ("d", "d")),
                  *affine(b + "cross_attn.q", h + "encoder_attn.q_proj", ("d", "d")),
                  *affine(b + "cross_attn.kv", [h + f"encoder_attn.{x}_proj" for x in "kv"],
                          ("d", "d"), bias=False),
                  fuse(b + "cross_attn.kv.bias", NO_K_BIAS,
                       Part(h + "encoder_attn.v_proj.bias", ("d",)))]
    return rules


RULES = (
    *affine("stem.convs.0", "{p}encoder.conv1", ("d", "mels", 3)),
    *affine("stem.convs.2", "{p}encoder.conv2", ("d", "d", 3)),
    one("encoder.pos_emb", "{p}encoder.embed_positions.weight", ("source", "d")),
    *block("encoder", "{e}", "encoder_ffn", cross=False),
    *affine("encoder.norm", "{p}encoder.layer_norm", ("d",)),
    *block("decoder", "{i}", "ff", cross=True),
    *affine("decoder.norm", "{p}decoder.layer_norm", ("d",)),
    one("tok_emb.weight", "{p}decoder.embed_tokens.weight", ("V", "d")),
    one("decoder.pos_emb", "{p}decoder.embed_positions.weight", ("ctx", "d")),
    tie("head.weight", "tok_emb.weight", checked="proj_out.weight"),
)

# our settings <-> config.json's
MODEL_KEYS = (("vocab_size", "vocab_size"), ("n_layer", "decoder_layers"),
              ("n_head", "decoder_attention_heads"), ("d_model", "d_model"),
              ("d_ff", "decoder_ffn_dim"), ("context", "max_target_positions", 448))
TASK_KEYS = (("n_mels", "num_mel_bins", 80), ("source_positions", "max_source_positions", 1500),
             ("encoder_layers", "encoder_layers"),
             ("encoder_heads", "encoder_attention_heads"), ("encoder_ffn", "encoder_ffn_dim"))
FIXED = {"norm": "layernorm", "norm_eps": 1e-5, "mlp": "gelu", "positions": "learned",
         "bias": True, "tie_embeddings": True, "cross_attention": True}
UNSUPPORTED = (("scale_embedding", False), ("use_weighted_layer_sum", False),
               ("tie_word_embeddings", True))


def model_in(config: dict) -> ModelConfig:
    """The decoder's ModelConfig, refusing what the model here does not run."""
    for key, ok in UNSUPPORTED:
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
    return ModelConfig(**{k: int(v) for k, v in keys_in(config, MODEL_KEYS).items()}, **FIXED)


def task_in(ckpt, cfg: ModelConfig, tokenizer) -> TranscribeConfig:
    """Features, encoder and the prompt's tokens, from config.json, preprocessor_config.json,
    generation_config.json and the tokenizer's special tokens."""
    config, tok = ckpt.config, tokenizer.tok
    pre, gen = ckpt.json("preprocessor_config.json"), ckpt.json("generation_config.json")
    task = {k: int(v) for k, v in keys_in(config, TASK_KEYS).items()}
    n_mels, source = task["n_mels"], task["source_positions"]
    if pre.get("feature_size", n_mels) != n_mels:
        raise ConfigError(f"preprocessor_config.json's feature_size={pre['feature_size']} "
                          f"differs from config.json's num_mel_bins={n_mels}")
    rate, hop = int(pre.get("sampling_rate", 16000)), int(pre.get("hop_length", 160))
    if "chunk_length" in pre and pre["chunk_length"] * rate != 2 * source * hop:
        raise ConfigError(f"preprocessor_config.json's chunk_length={pre['chunk_length']} s "
                          f"is not the encoder's window of {2 * source} frames of {hop} "
                          f"samples at {rate} Hz")

    def special(name: str, gen_value=None):
        return gen_value if gen_value is not None else tok.token_to_id(name)

    multilingual = gen.get("is_multilingual", tok.token_to_id("<|en|>") is not None)
    start = special("<|startoftranscript|>", gen.get("decoder_start_token_id",
                                                     config.get("decoder_start_token_id")))
    eos = gen.get("eos_token_id", config.get("eos_token_id"))
    eos = special("<|endoftext|>", eos[0] if isinstance(eos, list) else eos)
    no_ts = special("<|notimestamps|>", gen.get("no_timestamps_token_id"))
    language = task_id = None
    if multilingual:
        language = special("<|en|>", (gen.get("lang_to_id") or {}).get("<|en|>"))
        task_id = special("<|transcribe|>", (gen.get("task_to_id") or {}).get("transcribe"))
        if language is None or task_id is None:
            raise ConfigError("this multilingual Whisper has no <|en|> or <|transcribe|> token "
                              "(tokenizer.json, generation_config.json); it cannot be prompted")
    if start is None or eos is None:
        raise ConfigError("neither generation_config.json nor tokenizer.json names "
                          "<|startoftranscript|> and <|endoftext|>; save the Whisper "
                          "tokenizer beside the weights and import again")
    ids = {"decoder_start_token_id": start, "eos_token_id": eos, "<|en|>": language,
           "<|transcribe|>": task_id, "no_timestamps_token_id": no_ts}
    for name, i in ids.items():
        if i is not None and not 0 <= i < cfg.vocab_size:
            raise ConfigError(f"{name}={i} is outside the vocabulary of {cfg.vocab_size} tokens")
    if no_ts is not None and no_ts <= eos:
        raise ConfigError(f"no_timestamps_token_id={no_ts} is not after <|endoftext|>={eos}; "
                          "Whisper's layout is text, then special tokens, then timestamps")
    suppress = gen.get("suppress_tokens", config.get("suppress_tokens")) or ()
    begin = gen.get("begin_suppress_tokens", config.get("begin_suppress_tokens")) or ()
    heads = [tuple(pair) for pair in gen.get("alignment_heads") or ()]
    bad = [p for p in heads
           if len(p) != 2 or not (0 <= p[0] < cfg.n_layer and 0 <= p[1] < cfg.n_head)]
    if bad:
        raise ConfigError(f"generation_config.json's alignment_heads holds {list(bad[0])}, not a "
                          f"(layer, head) of this decoder's {cfg.n_layer} layers x {cfg.n_head} "
                          "heads")
    languages = sorted(((name.strip("<|>"), int(i)) for name, i in
                        (gen.get("lang_to_id") or {}).items()), key=lambda x: x[1])
    return TranscribeConfig(
        **task, sample_rate=rate, n_fft=int(pre.get("n_fft", 400)), hop=hop,
        start_id=start, language_id=language, task_id=task_id, no_timestamps_id=no_ts,
        eos_id=eos, suppress=tuple(suppress), begin_suppress=tuple(begin),
        max_initial_timestamp=gen.get("max_initial_timestamp_index"),
        timestamps=no_ts is not None, max_new_tokens=max(1, cfg.context // 2),
        alignment_heads=tuple(heads), languages=tuple(languages) if multilingual else ())


def config_out(cfg: ModelConfig, task: TranscribeConfig, kept: dict) -> tuple[dict, dict]:
    """config.json, generation_config.json (the imported one's language table, updated) and
    preprocessor_config.json."""
    eos = task.eos_id
    tokens = {"decoder_start_token_id": task.start_id, "eos_token_id": eos, "bos_token_id": eos,
              "pad_token_id": eos, "suppress_tokens": list(task.suppress),
              "begin_suppress_tokens": list(task.begin_suppress)}
    config = {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
              **keys_out(cfg, MODEL_KEYS), **keys_out(task, TASK_KEYS), **tokens,
              "activation_function": "gelu", "scale_embedding": False,
              "tie_word_embeddings": True, "dropout": 0.0, "attention_dropout": 0.0,
              "activation_dropout": 0.0, "use_cache": True, "is_encoder_decoder": True}
    generation = {**kept.get("generation_config.json", {}), **tokens,
                  "is_multilingual": task.language_id is not None}
    if task.no_timestamps_id is not None:
        generation["no_timestamps_token_id"] = task.no_timestamps_id
    if task.max_initial_timestamp is not None:
        generation["max_initial_timestamp_index"] = task.max_initial_timestamp
    if task.alignment_heads:
        generation["alignment_heads"] = [list(pair) for pair in task.alignment_heads]
    if task.languages:
        generation["lang_to_id"] = {f"<|{code}|>": i for code, i in task.languages}
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
    return config, {"generation_config.json": generation,
                    "preprocessor_config.json": processor}


WHISPER = Adapter(
    name="Whisper", model_types=("whisper",), task="transcribe", rules=RULES,
    model_in=model_in, task_in=task_in, config_out=config_out,
    build=lambda cfg, task: TranscribeTask(task).build_model(cfg),
    task_dims=lambda task: {"encoder_layers": task.encoder_layers,
                            "encoder_ffn": task.encoder_ffn, "mels": task.n_mels,
                            "source": task.source_positions},
    shape="Whisper-shaped (pre-norm LayerNorm blocks with GELU, biases and learned positions)",
    requires={"norm": ("layernorm",), "norm_eps": (1e-5,), "mlp": ("gelu",),
              "positions": ("learned",), "bias": (True,), "qkv_bias": (None, True),
              "grouped_query": (False,), "norm_position": ("pre",),
              "cross_attention": (True,)},
    prefix="model.", unexpected="the Whisper here does not, so it is not imported",
    tokenizer="Whisper's tokenizer beside the weights (WhisperTokenizerFast.from_pretrained("
              "...).save_pretrained(DIR))", keep=("generation_config.json",))


def export_whisper(run, out: str | Path) -> Path:
    """A WhisperForConditionalGeneration folder from a loaded transcribe run."""
    return export_run(run, out, (WHISPER,))
