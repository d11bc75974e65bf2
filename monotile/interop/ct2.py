"""CTranslate2 models (the folders faster-whisper and whisperX load) in, through the same
Whisper adapter as a Hugging Face folder: model.bin's variables are renamed and split into
transformers' Whisper names, its config.json and vocabulary become generation_config.json's
entries, and interop/whisper.py makes the transcribe run.

    monotile import ct2 DIR --out RUN      DIR: model.bin, config.json, tokenizer.json,
                                                vocabulary.txt (or .json)

model.bin (python/ctranslate2/specs/model_spec.py `_serialize`), little-endian:

    u32 version | str spec | u32 revision | u32 n | n x variable | u32 m | m x (str alias, str name)
    variable = str name, u8 rank, u32 dims[rank], u8 dtype, u32 nbytes, nbytes of data
    str      = u16 length (with the closing NUL), UTF-8 bytes, NUL
    dtype    = 0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16

Versions 4-6 share this layout (6 added config.json beside it). A quantized weight w is
stored as q = round(w s) with its `NAME_scale` s (int8: one s per row, s = 127 / max|w_row|;
int16: one s for the tensor), read back as w = q / s. An alias is one variable under a second
name: Whisper's output projection is the token embedding (tied).

What the names differ by, each undone in one place (RULES, walked by adapter.tensors_out):
- self-attention's q, k, v are fused by rows in linear_0 (its k bias zeros: Whisper's k_proj
  has none); the cross-attention's linear_0 is q and linear_1 fuses k | v.
- layer norms are gamma and beta; a linear's output is linear_1 (self) or linear_2 (cross).
- sizes are read from the shapes, the heads from the scalars encoder/num_heads and
  decoder/num_heads; the other scalars must say what transformers' Whisper is (pre-norm,
  GELU, no ALiBi, unscaled embeddings), else the import is refused by name.
The model is multilingual when its vocabulary has 51865 tokens or more (OpenAI's rule); its
languages are then config.json's lang_ids, named by the vocabulary. The run transcribes as
faster-whisper does: a short window's log-mel padded with zero frames (pad="features") and
OpenAI's beam search (beam_search="whisper"); `--set` changes either.
"""

from __future__ import annotations

import dataclasses
import json
import re
import struct
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..rundir import new_run_dir
from .adapter import Part, Rule, _expand, _size, lacking, one, tensors_out
from .convert import Checkpoint, to_run
from .whisper import WHISPER

VERSIONS = (4, 5, 6)            # binary versions with the layout above
SPECS = {"WhisperSpec": 3}      # spec -> the revision read
DTYPES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
FLOATS = {"float32": np.float32, "float16": np.float16}
MULTILINGUAL_VOCAB = 51865
# scalars that must hold these values for transformers' Whisper (absent ones are fine);
# alignment_layer/alignment_heads are CTranslate2's own defaults for attention output, unused
SCALARS = {"decoder/pre_norm": (1,), "decoder/activation": (3,),  # common_spec GELU = 3
           "decoder/alibi": (0,), "decoder/alibi_use_positive_positions": (0,),
           "decoder/scale_alibi": (0,), "decoder/scale_embeddings": (0,),
           "decoder/start_from_zero_embedding": (0,), "decoder/alignment_layer": None,
           "decoder/alignment_heads": None, "encoder/num_heads": None,
           "decoder/num_heads": None}
MEANING = {"decoder/pre_norm": "post-norm blocks", "decoder/activation": "another activation",
           "decoder/scale_embeddings": "scaled embeddings"}


def is_ct2(path) -> bool:
    """A folder holding CTranslate2's model.bin."""
    return (Path(path) / "model.bin").is_file()


# ---- the table: CTranslate2's names (ours here) <- transformers' Whisper names -------------

def _norm(ct2: str, hf: str) -> list[Rule]:
    return [one(f"{ct2}/gamma", f"{hf}.weight", ("d",)), one(f"{ct2}/beta", f"{hf}.bias", ("d",))]


def _linear(ct2: str, hf: str, shape: tuple) -> list[Rule]:
    return [one(f"{ct2}/weight", f"{hf}.weight", shape),
            one(f"{ct2}/bias", f"{hf}.bias", shape[:1])]


def _layer(stack: str, i: str, ff: str, cross: bool) -> list[Rule]:
    c, h = f"{stack}/layer_{{{i}}}/", f"model.{stack}.layers.{{{i}}}."
    no_k = lacking("k", ("d",), "Whisper's k_proj has no bias")
    s, a = c + "self_attention/", h + "self_attn."
    rules = [Rule(s + "linear_0/weight", tuple(Part(f"{a}{x}_proj.weight", ("d", "d"))
                                              for x in "qkv")),
             Rule(s + "linear_0/bias", (Part(a + "q_proj.bias", ("d",)), no_k,
                                        Part(a + "v_proj.bias", ("d",)))),
             *_linear(s + "linear_1", a + "out_proj", ("d", "d")),
             *_norm(s + "layer_norm", h + "self_attn_layer_norm"),
             *_linear(c + "ffn/linear_0", h + "fc1", (ff, "d")),
             *_linear(c + "ffn/linear_1", h + "fc2", ("d", ff)),
             *_norm(c + "ffn/layer_norm", h + "final_layer_norm")]
    if cross:
        x, e = c + "attention/", h + "encoder_attn."
        rules += [*_linear(x + "linear_0", e + "q_proj", ("d", "d")),
                  Rule(x + "linear_1/weight", (Part(e + "k_proj.weight", ("d", "d")),
                                               Part(e + "v_proj.weight", ("d", "d")))),
                  Rule(x + "linear_1/bias", (no_k, Part(e + "v_proj.bias", ("d",)))),
                  *_linear(x + "linear_2", e + "out_proj", ("d", "d")),
                  *_norm(x + "layer_norm", h + "encoder_attn_layer_norm")]
    return rules


RULES = (
    *_linear("encoder/conv1", "model.encoder.conv1", ("d", "mels", 3)),
    *_linear("encoder/conv2", "model.encoder.conv2", ("d", "d", 3)),
    one("encoder/position_encodings/encodings", "model.encoder.embed_positions.weight",
        ("source", "d")),
    *_layer("encoder", "e", "encoder_ffn", cross=False),
    *_norm("encoder/layer_norm", "model.encoder.layer_norm"),
    one("decoder/embeddings/weight", "model.decoder.embed_tokens.weight", ("V", "d")),
    one("decoder/position_encodings/encodings", "model.decoder.embed_positions.weight",
        ("ctx", "d")),
    *_layer("decoder", "i", "ff", cross=True),
    *_norm("decoder/layer_norm", "model.decoder.layer_norm"),
    one("decoder/projection/weight", "proj_out.weight", ("V", "d")),
)
NAMES = dataclasses.replace(WHISPER, name="CTranslate2 Whisper", rules=RULES, prefix="",
                            writes_prefix=False, ignored=())


# ---- model.bin -----------------------------------------------------------------------------

class _Bytes:
    """A cursor over model.bin's bytes; running past the end is a truncated file."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.at, self.path, self.where = data, 0, path, "the header"

    def take(self, n: int) -> memoryview:
        if self.at + n > len(self.data):
            raise CheckpointError(f"{self.path} is truncated: it ends inside {self.where} "
                                  f"(byte {len(self.data):,}); copy or convert the model again")
        view = memoryview(self.data)[self.at:self.at + n]
        self.at += n
        return view

    def u(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        raw = bytes(self.take(self.u("H")))
        if not raw.endswith(b"\0"):
            raise CheckpointError(f"{self.path} is corrupt: a name in {self.where} does not end "
                                  "with NUL; copy or convert the model again")
        return raw[:-1].decode("utf-8", errors="replace")


def read_model_bin(path: str | Path) -> dict:
    """model.bin -> {"version", "spec", "revision", "variables": {name: (dtype, shape, bytes)},
    "aliases": {alias: name}}; refuses other versions and specs by name before reading on."""
    path = Path(path)
    b = _Bytes(path.read_bytes(), path)
    version = b.u("I")
    if version not in VERSIONS:
        raise ConfigError(f"{path} is CTranslate2 binary version {version}; import reads "
                          f"versions {VERSIONS[0]}-{VERSIONS[-1]}: convert the model again with "
                          "a recent ct2-transformers-converter")
    spec, revision = b.string(), b.u("I")
    if spec not in SPECS:
        raise ConfigError(f"{path} holds a CTranslate2 {spec or 'unnamed spec'}; import ct2 reads "
                          f"{', '.join(SPECS)} (faster-whisper's models)")
    if revision != SPECS[spec]:
        raise ConfigError(f"{path} is {spec} revision {revision}; import ct2 reads revision "
                          f"{SPECS[spec]}: convert the model again with a recent "
                          "ct2-transformers-converter")
    variables = {}
    for k in range(b.u("I")):
        b.where = f"variable {k + 1}"
        name = b.string()
        b.where = f"variable {name!r}"
        shape = tuple(b.u("I") for _ in range(b.u("B")))
        type_id, nbytes = b.u("B"), b.u("I")
        if type_id >= len(DTYPES):
            raise ConfigError(f"variable {name!r} in {path} has dtype id {type_id}, which import "
                              f"does not read ({', '.join(DTYPES)})")
        dtype = DTYPES[type_id]
        if nbytes != int(np.prod(shape, dtype=np.int64)) * np.dtype(_np(dtype)).itemsize:
            raise CheckpointError(f"variable {name!r} in {path} has {nbytes} bytes for shape "
                                  f"{shape} of {dtype}; the file is corrupt")
        variables[name] = (dtype, shape, b.take(nbytes))
    b.where = "the aliases"
    aliases = {}
    for _ in range(b.u("I")):
        alias = b.string()
        aliases[alias] = b.string()
    if b.at != len(b.data):
        raise CheckpointError(f"{path} has {len(b.data) - b.at:,} bytes after its last alias; "
                              "the file is corrupt")
    return {"version": version, "spec": spec, "revision": revision, "variables": variables,
            "aliases": aliases}


def _np(dtype: str):
    return {"bfloat16": np.uint16, "int8": np.int8, "int16": np.int16,
            "int32": np.int32}.get(dtype) or FLOATS[dtype]


def _array(dtype: str, shape: tuple, data) -> np.ndarray:
    a = np.frombuffer(data, dtype=_np(dtype)).reshape(shape)
    if dtype == "bfloat16":  # the high half of a float32
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a


def dequantize(variables: dict, aliases: dict) -> tuple[dict, dict, Counter]:
    """(weights as float32 tensors, scalars as ints, a count of the stored dtypes): float16 and
    bfloat16 widened exactly, int8/int16 weights divided by their scales, aliases resolved."""
    for alias, name in aliases.items():
        if name not in variables:
            raise CheckpointError(f"alias {alias!r} names {name!r}, which model.bin lacks; the "
                                  "file is corrupt")
        variables = {**variables, alias: variables[name]}
        if name + "_scale" in variables:
            variables[alias + "_scale"] = variables[name + "_scale"]
    weights, scalars, kinds = {}, {}, Counter()
    for name, (dtype, shape, data) in variables.items():
        if name.endswith("_scale") and name[:-6] in variables:
            continue
        if name.endswith("_zero"):
            raise ConfigError(f"variable {name!r}: this model is AWQ-quantized, which import "
                              "does not read; convert it again with --quantization float16 or "
                              "int8")
        a = _array(dtype, shape, data)
        if shape and name not in aliases:
            kinds[dtype] += 1
        if not shape:
            scalars[name] = a.item()
        elif name + "_scale" in variables:
            if dtype not in ("int8", "int16"):
                raise ConfigError(f"variable {name!r} is {dtype} with a scale; import reads "
                                  "int8 and int16 weights with scales")
            scale = _array(*variables[name + "_scale"]).astype(np.float32)
            scale = scale.reshape(-1, *[1] * (len(shape) - 1)) if scale.ndim else scale
            weights[name] = torch.from_numpy(a.astype(np.float32) / scale)
        elif dtype in ("int8", "int16", "int32"):
            raise ConfigError(f"variable {name!r} is {dtype} without a scale, which import does "
                              "not read; convert the model with --quantization float16")
        else:
            weights[name] = torch.from_numpy(a.astype(np.float32))
    return weights, scalars, kinds


# ---- the folder as a Hugging Face Whisper checkpoint -------------------------------------------

def _vocabulary(src: Path) -> list[str]:
    if (src / "vocabulary.json").is_file():
        return json.loads((src / "vocabulary.json").read_text(encoding="utf-8"))
    if (src / "vocabulary.txt").is_file():
        return (src / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    raise CheckpointError(f"{src} has no vocabulary.txt (nor vocabulary.json), which a "
                          "CTranslate2 model folder holds; convert the model again")


def _sizes(src: Path, weights: dict, scalars: dict) -> dict:
    """The family's sizes (adapter dims) from the variables' shapes and the head scalars."""
    def shape(name):
        if name not in weights:
            raise CheckpointError(f"{src / 'model.bin'} has no variable {name!r}; it is not a "
                                  "whole Whisper model")
        return weights[name].shape
    layers = {s: len({m.group(1) for n in weights if (m := re.match(s + r"/layer_(\d+)/", n))})
              for s in ("encoder", "decoder")}
    for name in ("encoder/num_heads", "decoder/num_heads"):
        if name not in scalars:
            raise CheckpointError(f"{src / 'model.bin'} has no variable {name!r}; it is not a "
                                  "whole Whisper model")
    V, d = shape("decoder/embeddings/weight")
    return {"V": V, "d": d, "layers": layers["decoder"], "encoder_layers": layers["encoder"],
            "ff": shape("decoder/layer_0/ffn/linear_0/weight")[0],
            "encoder_ffn": shape("encoder/layer_0/ffn/linear_0/weight")[0],
            "mels": shape("encoder/conv1/weight")[1],
            "source": shape("encoder/position_encodings/encodings")[0],
            "ctx": shape("decoder/position_encodings/encodings")[0],
            "heads": int(scalars["decoder/num_heads"]),
            "encoder_heads": int(scalars["encoder/num_heads"])}


def _check_table(src: Path, weights: dict, scalars: dict, dims: dict) -> None:
    """Every variable the table names is there in its shape, and nothing else is."""
    for name, value in scalars.items():
        if name not in SCALARS:
            raise ConfigError(f"{src / 'model.bin'} has the setting {name}={value}, which "
                              "transformers' Whisper does not have; it cannot be imported")
        if SCALARS[name] is not None and value not in SCALARS[name]:
            raise ConfigError(f"{src / 'model.bin'} has {name}={value} "
                              f"({MEANING.get(name, 'not Whisper')}; Whisper's is "
                              f"{SCALARS[name][0]}); it cannot be imported")
    named = set()
    for rule, ours, _ in _expand(RULES, dims, ""):
        named.add(ours)
        if ours not in weights:
            raise CheckpointError(f"{src / 'model.bin'} has no variable {ours!r}; it is not a "
                                  "whole Whisper model")
        sizes = [_size(p.shape, dims) for p in rule.parts]
        want = (sum(s[0] for s in sizes), *sizes[0][1:])
        if tuple(weights[ours].shape) != want:
            raise CheckpointError(f"variable {ours!r} has shape {tuple(weights[ours].shape)}, "
                                  f"the model's sizes imply {want}")
    extra = sorted(set(weights) - named)
    if extra:
        raise CheckpointError(f"unexpected variable {extra[0]!r} in {src / 'model.bin'}; this "
                              "model has parts the Whisper here does not, so it is not imported")


def read_ct2(src: str | Path, tmp: Path) -> Checkpoint:
    """The folder as a Hugging Face Whisper checkpoint: transformers' tensor names, a
    config.json, and a generation_config.json (written in `tmp`) with the prompt's tokens,
    the suppressed ones, the alignment heads and the languages."""
    src = Path(src)
    if not is_ct2(src):
        raise CheckpointError(f"{src} has no model.bin; give a CTranslate2 model folder "
                              "(model.bin, config.json, tokenizer.json, vocabulary.txt)")
    info = read_model_bin(src / "model.bin")
    weights, scalars, kinds = dequantize(info["variables"], info["aliases"])
    dims = _sizes(src, weights, scalars)
    _check_table(src, weights, scalars, dims)
    tensors = tensors_out(NAMES, dims, weights)
    settings = json.loads((src / "config.json").read_text(encoding="utf-8")) \
        if (src / "config.json").is_file() else {}
    vocab = _vocabulary(src)
    vocab = vocab[:-1] if vocab and vocab[-1] == "" else vocab  # the file's closing newline
    if len(vocab) != dims["V"]:
        raise CheckpointError(f"{src}'s vocabulary has {len(vocab)} tokens but the model "
                              f"{dims['V']}; they do not belong together")
    ids = {t: i for i, t in enumerate(vocab)}
    special = {k: ids.get(t) for k, t in (("sot", "<|startoftranscript|>"),
                                          ("eos", "<|endoftext|>"),
                                          ("no_ts", "<|notimestamps|>"),
                                          ("transcribe", "<|transcribe|>"),
                                          ("translate", "<|translate|>"))}
    if special["sot"] is None or special["eos"] is None:
        raise CheckpointError(f"{src}'s vocabulary has no <|startoftranscript|> or "
                              "<|endoftext|>; it is not a Whisper vocabulary")
    multilingual = dims["V"] >= MULTILINGUAL_VOCAB
    config = {"model_type": "whisper", "architectures": ["WhisperForConditionalGeneration"],
              "vocab_size": dims["V"], "d_model": dims["d"],
              "encoder_layers": dims["encoder_layers"], "decoder_layers": dims["layers"],
              "encoder_attention_heads": dims["encoder_heads"],
              "decoder_attention_heads": dims["heads"], "encoder_ffn_dim": dims["encoder_ffn"],
              "decoder_ffn_dim": dims["ff"], "num_mel_bins": dims["mels"],
              "max_source_positions": dims["source"], "max_target_positions": dims["ctx"],
              "activation_function": "gelu", "scale_embedding": False,
              "decoder_start_token_id": special["sot"], "eos_token_id": special["eos"]}
    generation = {"decoder_start_token_id": special["sot"], "eos_token_id": special["eos"],
                  "is_multilingual": multilingual,
                  "suppress_tokens": list(settings.get("suppress_ids") or []),
                  "begin_suppress_tokens": list(settings.get("suppress_ids_begin") or []),
                  "alignment_heads": [list(p) for p in settings.get("alignment_heads") or []],
                  "max_initial_timestamp_index": 50}  # faster-whisper's 1 s
    if special["no_ts"] is not None:
        generation["no_timestamps_token_id"] = special["no_ts"]
    if multilingual:
        lang = [i for i in settings.get("lang_ids") or [] if 0 <= i < len(vocab)]
        generation["lang_to_id"] = {vocab[i]: i for i in lang}
        generation["task_to_id"] = {"transcribe": special["transcribe"],
                                    "translate": special["translate"]}
    (tmp / "generation_config.json").write_text(json.dumps(generation, indent=1),
                                                encoding="utf-8")
    files = {"generation_config.json": tmp / "generation_config.json"}
    if (src / "preprocessor_config.json").is_file():
        files["preprocessor_config.json"] = src / "preprocessor_config.json"
    tokenizer = src / "tokenizer.json"
    return Checkpoint(src, config, tensors, tokenizer if tokenizer.is_file() else None, files,
                      "has no tokenizer.json (faster-whisper's models ship one)",
                      # windows filled, and beams searched, as faster-whisper does
                      task={"pad": "features", "beam_search": "whisper"},
                      imported={"format": "ctranslate2", "spec": info["spec"],
                                "revision": info["revision"], "binary_version": info["version"],
                                "dtypes": dict(kinds)})


def import_ct2(src: str | Path, out: str | Path | None = None) -> Path:
    """A monotile transcribe run from a CTranslate2 Whisper folder; every check runs before
    the run directory is made."""
    src = Path(src)
    out = new_run_dir(out, src.name)  # refused now, before model.bin is read
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; give a CTranslate2 model folder "
                              "(model.bin, config.json, tokenizer.json, vocabulary.txt)")
    with tempfile.TemporaryDirectory() as tmp:
        return to_run(read_ct2(src, Path(tmp)), WHISPER, out)
