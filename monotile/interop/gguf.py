"""GGUF files (llama.cpp, ollama, LM Studio) in and out, through the same adapters as a
Hugging Face folder: the file's names and metadata become a Hugging Face checkpoint that the
family's adapter takes (llama.py, gpt2.py), and a run comes back out through that adapter and
the same tables walked backwards.

    import  file --read_gguf--> Checkpoint (config.json keys, Hugging Face tensor names)
                 --to_run (convert.py), the family's adapter--> run directory
    export  run --from_run, the adapter--> Hugging Face names --the tables backwards--> file

A GGUF file is the magic "GGUF", a version, key/values (general.*, {arch}.*, tokenizer.*),
each tensor's name, shape, type and offset, then the aligned data. What differs from a
Hugging Face checkpoint, each undone in one place:
- shapes are listed ne0 first (the contiguous dimension), numpy's shape reversed: a weight
  listed [in, out] reads back (out, in), nn.Linear's layout; GPT-2's Conv1D (in, out) weights
  are transposed by its table (llama.cpp's converter transposed them).
- llama: the converter permutes each head's rows of Wq and Wk from Hugging Face's rotate-half
  order to interleaved pairs, row 2j <- j and 2j+1 <- j + hd/2 (LlamaModel.permute), which is
  monotile's own order (llama.half_to_pairs). The table undoes it, the Llama adapter redoes
  it: permutations, exact. qwen2 is stored unpermuted (llama.cpp rotates its halves).
- Llama 3's RoPE scaling is a tensor, rope_freqs (each frequency's divisor), read back into
  rope_scaling's numbers and checked to give the same divisors.
- GPT-2's output is a copy of the token embedding: tied when equal.
- weights are quantized in blocks (Q4_1: 32 weights share a scale and a minimum, 4 bits each);
  gguf.quants, llama.cpp's own Python reference, dequantizes them to float32 and quantizes
  on export (norms and other 1-D tensors stay F32, as llama.cpp keeps them).
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from ..rundir import new_run_dir
from ..train.checkpoint import atomic_write
from .adapter import (SAME, Adapter, Pair, affine, one, run_settings, tensors_in, tensors_out,
                      trunk_dims)
from .convert import Checkpoint, from_run, to_run
from .gguf_vocab import tokenizer_in, tokenizer_out
from .gpt2 import CONV1D, GPT2
from .llama import LLAMA, half_to_pairs, pairs_to_half

MAGIC = b"GGUF"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
READS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K",
         "Q5_K", "Q6_K")
WRITES = {"f32": ("F32", "ALL_F32"), "f16": ("F16", "MOSTLY_F16"),
          "bf16": ("BF16", "MOSTLY_BF16"), "q8_0": ("Q8_0", "MOSTLY_Q8_0"),
          "q4_0": ("Q4_0", "MOSTLY_Q4_0")}


def is_gguf(path) -> bool:
    """Whether `path` is a file that begins with GGUF's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ---- the tables: GGUF names and keys <-> Hugging Face's --------------------------------------

def unpermute(heads: str) -> Pair:
    """llama.cpp's Wq/Wk rows (interleaved pairs) -> Hugging Face's (rotate-half), and back."""
    return Pair(lambda w, dims: pairs_to_half(w, dims[heads]),
                lambda w, dims: half_to_pairs(w, dims[heads]))


def llama_names(permuted: bool) -> tuple:
    """Hugging Face's Llama (and Qwen2) names <- GGUF's, with their shapes in GGUF."""
    q, k = (unpermute("heads"), unpermute("kv_heads")) if permuted else (SAME, SAME)
    G, H = "blk.{i}.", "model.layers.{i}."
    a = H + "self_attn."
    return (
        one("model.embed_tokens.weight", "token_embd.weight", ("V", "d")),
        one(H + "input_layernorm.weight", G + "attn_norm.weight", ("d",)),
        one(a + "q_proj.weight", G + "attn_q.weight", ("q", "d"), q),
        one(a + "k_proj.weight", G + "attn_k.weight", ("kv", "d"), k),
        one(a + "v_proj.weight", G + "attn_v.weight", ("kv", "d")),
        one(a + "q_proj.bias", G + "attn_q.bias", ("q",), q, when="qkv_bias"),
        one(a + "k_proj.bias", G + "attn_k.bias", ("kv",), k, when="qkv_bias"),
        one(a + "v_proj.bias", G + "attn_v.bias", ("kv",), when="qkv_bias"),
        one(a + "o_proj.weight", G + "attn_output.weight", ("d", "q")),
        one(H + "post_attention_layernorm.weight", G + "ffn_norm.weight", ("d",)),
        one(H + "mlp.gate_proj.weight", G + "ffn_gate.weight", ("ff", "d")),
        one(H + "mlp.up_proj.weight", G + "ffn_up.weight", ("ff", "d")),
        one(H + "mlp.down_proj.weight", G + "ffn_down.weight", ("d", "ff")),
        one("model.norm.weight", "output_norm.weight", ("d",)),
        one("lm_head.weight", "output.weight", ("V", "d"), when="untied"))


def gpt2_names() -> tuple:
    """Hugging Face's GPT-2 names <- GGUF's: Conv1D weights are stored transposed."""
    G, H, T = "blk.{i}.", "transformer.h.{i}.", "transformer."
    return (
        one(T + "wte.weight", "token_embd.weight", ("V", "d")),
        one(T + "wpe.weight", "position_embd.weight", ("ctx", "d")),
        *affine(H + "ln_1", G + "attn_norm", ("d",)),
        *affine(H + "attn.c_attn", G + "attn_qkv", ("3d", "d"), CONV1D),
        *affine(H + "attn.c_proj", G + "attn_output", ("d", "d"), CONV1D),
        *affine(H + "ln_2", G + "ffn_norm", ("d",)),
        *affine(H + "mlp.c_fc", G + "ffn_up", ("ff", "d"), CONV1D),
        *affine(H + "mlp.c_proj", G + "ffn_down", ("d", "ff"), CONV1D),
        *affine(T + "ln_f", "output_norm", ("d",)),
        one("lm_head.weight", "output.weight", ("V", "d"), optional=True))


# ({arch}.KEY, config.json's key); a float is written FLOAT32, an int UINT32
LLAMA_KEYS = (("block_count", "num_hidden_layers"), ("context_length", "max_position_embeddings"),
              ("embedding_length", "hidden_size"), ("feed_forward_length", "intermediate_size"),
              ("attention.head_count", "num_attention_heads"),
              ("attention.head_count_kv", "num_key_value_heads"),
              ("attention.layer_norm_rms_epsilon", "rms_norm_eps"),
              ("rope.freq_base", "rope_theta"))
GPT2_KEYS = (("block_count", "n_layer"), ("context_length", "n_positions"),
             ("embedding_length", "n_embd"), ("feed_forward_length", "n_inner"),
             ("attention.head_count", "n_head"),
             ("attention.layer_norm_epsilon", "layer_norm_epsilon"))


LLAMA_DEFAULTS = {"attention.head_count_kv": "attention.head_count", "rope.freq_base": 10000.0}
GPT2_DEFAULTS = {"feed_forward_length": None}  # the GPT-2 adapter's 4 d


@dataclass(frozen=True)
class Family:
    arch: str           # general.architecture, and config.json's model_type
    adapter: Adapter    # the family's adapter, which makes and exports the run
    keys: tuple         # metadata <-> config.json
    defaults: dict      # a key's value when the file lacks it (another key's, by name)
    names: Adapter      # Hugging Face names (as "ours") <- GGUF's, walked by tensors_in/out


def _family(arch: str, adapter: Adapter, keys: tuple, defaults: dict, rules: tuple) -> Family:
    names = dataclasses.replace(adapter, name=f"GGUF {arch}", rules=rules, prefix="",
                                writes_prefix=False, ignored=())
    return Family(arch, adapter, keys, defaults, names)


FAMILIES = {
    "llama": _family("llama", LLAMA, LLAMA_KEYS, LLAMA_DEFAULTS, llama_names(permuted=True)),
    "qwen2": _family("qwen2", LLAMA, LLAMA_KEYS, LLAMA_DEFAULTS, llama_names(permuted=False)),
    "gpt2": _family("gpt2", GPT2, GPT2_KEYS, GPT2_DEFAULTS, gpt2_names()),
}


# ---- import ----------------------------------------------------------------------------------

def import_gguf(src: str | Path, out: str | Path | None = None, dtype: str = "float32") -> Path:
    """A monotile text run from a GGUF file (llama, qwen2 or gpt2 architecture, byte-level BPE
    vocabulary), weights dequantized to `dtype` (float32 or bfloat16). Everything is checked
    before the run directory is made."""
    if dtype not in DTYPES:
        raise ConfigError(f"dtype={dtype!r} is invalid: choose {' or '.join(DTYPES)}")
    src = Path(src)
    out = new_run_dir(out, src.stem)  # refused now, before the file is read
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, family = read_gguf(src, Path(tmp))
        return to_run(ckpt, family.adapter, out, DTYPES[dtype])


def read_gguf(src: Path, tmp: Path) -> tuple[Checkpoint, Family]:
    """The file as a Hugging Face checkpoint of its family (tokenizer.json written in `tmp`),
    every tensor dequantized to float32; refuses what cannot be read, by name."""
    import gguf
    src = Path(src)
    if not src.exists():
        raise CheckpointError(f"{src} does not exist; give the path of a .gguf file")
    if not is_gguf(src):
        raise CheckpointError(f"{src} is not a GGUF file (it does not begin with 'GGUF'); give "
                              "a .gguf file made by llama.cpp or ollama")
    try:
        reader = gguf.GGUFReader(src)
        meta = {k: f.contents() for k, f in reader.fields.items()}
    except Exception as e:  # the reader fails with whatever numpy or struct raised
        raise CheckpointError(f"{src} is truncated or corrupt ({type(e).__name__}: {e}); "
                              "download or copy it again") from None
    arch = meta.get("general.architecture")
    if arch not in FAMILIES:
        raise ConfigError(f"GGUF architecture {arch!r} is not supported; import reads "
                          f"{', '.join(FAMILIES)} (Llama 2/3, Mistral, SmolLM, Qwen2, GPT-2)")
    for t in reader.tensors:
        if t.tensor_type.name not in READS:
            raise ConfigError(f"tensor {t.name!r} is of type {t.tensor_type.name}, which import "
                              f"does not dequantize (it reads {', '.join(READS)}); requantize "
                              "the file with llama-quantize (e.g. Q4_K_M or Q8_0)")
    task = tokenizer_in(meta, tmp / "tokenizer.json")
    family = FAMILIES[arch]
    from tqdm.auto import tqdm
    tensors = {t.name: _dequantize(t) for t in tqdm(reader.tensors, desc="read", unit="tensor",
                                                    disable=None)}  # a bar on a terminal
    config = config_in(family, meta, tensors)
    cfg = family.adapter.model_in(config)
    hf = tensors_in(family.names, trunk_dims(cfg), tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    return Checkpoint(src, config, hf, tmp / "tokenizer.json", task=task,
                      imported={"format": "gguf", "architecture": arch,
                                "types": dict(types.most_common())}), family


def _dequantize(t) -> torch.Tensor:
    """One tensor as float32 in numpy's (PyTorch's) order: its ne shape reversed."""
    import gguf
    shape = tuple(int(n) for n in reversed(t.shape))
    array = gguf.quants.dequantize(t.data, t.tensor_type)
    if not array.flags.writeable:  # F32 comes back as a view of the mapped file
        array = array.copy()
    return torch.from_numpy(array.reshape(shape))


def config_in(family: Family, meta: dict, tensors: dict) -> dict:
    """config.json's keys from the file's metadata (and what only its tensors say)."""
    p = family.arch + "."

    def get(key):
        if p + key in meta:
            value = meta[p + key]
            return float(str(np.float32(value))) if isinstance(value, float) else int(value)
        if key in family.defaults:
            default = family.defaults[key]
            return get(default) if isinstance(default, str) else default
        raise CheckpointError(f"the file has no {p + key}; it is not a complete {family.arch} "
                              "GGUF, convert the model again")

    config = {"model_type": family.arch, **{hf: get(k) for k, hf in family.keys},
              "vocab_size": int(tensors["token_embd.weight"].shape[0]) if
              "token_embd.weight" in tensors else get("vocab_size")}
    if family.arch == "gpt2":
        output = tensors.get("output.weight")
        tied = output is None or torch.equal(output, tensors["token_embd.weight"])
        return {**config, "activation_function": "gelu_new", "tie_word_embeddings": tied}
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    config.update(head_dim=int(meta.get(p + "attention.key_length", head_dim)),
                  hidden_act="silu", tie_word_embeddings="output.weight" not in tensors,
                  attention_bias="blk.0.attn_q.bias" in tensors,
                  rope_scaling=rope_in(meta, p, tensors, config))
    if meta.get(p + "rope.dimension_count", config["head_dim"]) != config["head_dim"]:
        raise ConfigError(f"{p}rope.dimension_count={meta[p + 'rope.dimension_count']} rotates "
                          f"part of each head of {config['head_dim']}; the trunk rotates all")
    if p + "attention.sliding_window" in meta:
        config["sliding_window"] = int(meta[p + "attention.sliding_window"])
    return config


def rope_in(meta: dict, p: str, tensors: dict, config: dict) -> dict | None:
    """rope_scaling from rope.scaling.* (linear) or from the rope_freqs tensor (Llama 3)."""
    kind = meta.get(p + "rope.scaling.type", "none")
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(meta[p + "rope.scaling.factor"])}
    if kind != "none":
        return {"rope_type": kind}  # refused by name by the Llama adapter
    if "rope_freqs.weight" not in tensors:
        return None
    original = int(meta.get(p + "rope.scaling.original_context_length", 8192))
    return llama3_scaling(tensors.pop("rope_freqs.weight").double().numpy(),
                          config["rope_theta"], config["hidden_size"]
                          // config["num_attention_heads"], original)


def llama3_scaling(f: np.ndarray, theta: float, head_dim: int, original: int) -> dict | None:
    """Llama 3's rope_scaling from each frequency's divisor f_j: 1 where the wavelength
    2 pi / theta_j < original / high, `factor` where > original / low, and between them
    1 / f_j = (1 - s_j) / factor + s_j with s_j = (original / wavelength - low) / (high - low).
    The four numbers are recovered (any that give the same divisors), then checked."""
    if np.all(f == 1):
        return None
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    x = original / (2 * math.pi / inv)  # original / wavelength, rising with j's frequency
    factor = float(f.max())
    fast, slow = np.isclose(f, 1, rtol=1e-6, atol=0), np.isclose(f, factor, rtol=1e-6, atol=0)
    mid = ~(fast | slow)
    s = (1 / f[mid] - 1 / factor) / (1 - 1 / factor)
    if mid.sum() >= 2:  # s is a line in x: s = (x - low) / (high - low)
        slope, at0 = np.polyfit(x[mid], s, 1)
        low, high = -at0 / slope, (1 - at0) / slope
    else:  # the edges lie anywhere between the groups: take points between them
        top = x[slow].max() if slow.any() else x.min() / 2
        bottom = x[fast].min() if fast.any() else x.max() * 2
        if mid.sum() == 1:
            high = math.sqrt(x[mid][0] * bottom)
            low = (x[mid][0] - s[0] * high) / (1 - s[0])
        else:
            low, high = top ** (2 / 3) * bottom ** (1 / 3), top ** (1 / 3) * bottom ** (2 / 3)
    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": float(f"{low:.6g}"),
               "high_freq_factor": float(f"{high:.6g}"),
               "original_max_position_embeddings": original}
    if not np.allclose(rope_divisors(scaling, theta, head_dim), f, rtol=1e-4):
        raise ConfigError("the file's rope_freqs are not Llama 3's RoPE scaling; the trunk "
                          "cannot rotate by them")
    return scaling


def rope_divisors(scaling: dict, theta: float, head_dim: int) -> np.ndarray:
    """Each frequency's divisor under `scaling` (what llama.cpp's rope_freqs holds)."""
    from ..core.attention import scale_rope
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (inv / scale_rope(inv, scaling)).numpy()


# ---- export ----------------------------------------------------------------------------------

def export_gguf(run_dir: str | Path, out: str | Path, type: str = "f32") -> Path:
    """A GGUF file llama.cpp loads, from a text run with a GPT-2- or Llama-shaped causal trunk:
    its weights in `type` (f32, f16, bf16, q8_0, q4_0; norms and other 1-D tensors F32), its
    byte-level BPE vocabulary, chat template and bos/eos ids. Written to a temporary file and
    renamed into place once whole; nothing is written unless every check passed."""
    import gguf
    from ..run import load
    if type not in WRITES:
        raise ConfigError(f"--type {type} is invalid: choose {', '.join(WRITES)}")
    out = Path(out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose another --out")
    run = load(run_dir, device="cpu")
    if run.kind != "text" or run.task.config.model != "causal_lm":
        raise ConfigError(f"{run.dir} is a {run.kind} run without a causal language model; "
                          "export gguf takes text runs whose trunk is GPT-2- or Llama-shaped")
    if all(a.misfits(run_settings(run.configs)) for a in (GPT2, LLAMA)):
        raise ConfigError(f"{run.dir}'s model is neither {GPT2.shape} nor {LLAMA.shape}, so "
                          f"no GGUF architecture ({', '.join(FAMILIES)}) holds it")
    config, _, hf = from_run(run, (GPT2, LLAMA))
    family = FAMILIES[config["model_type"]]
    cfg, text_cfg = run.configs["model"], run.configs["text"]
    if family.arch == "gpt2" and cfg.mlp != "gelu_tanh":
        raise ConfigError(f"{run.dir}'s GELU is exact (mlp={cfg.mlp}); llama.cpp's GPT-2 uses "
                          "the tanh approximation (gelu_tanh), so it would not compute this model")
    if family.arch == "gpt2" and "lm_head.weight" not in hf:
        hf["lm_head.weight"] = hf["transformer.wte.weight"]  # as llama.cpp's converter writes it
    tensors = tensors_out(family.names, trunk_dims(cfg), hf)
    if len(tensors) != len(hf):
        raise ConfigError(f"{run.dir} has tensors the GGUF {family.arch} table has no name for")
    if (cfg.rope_scaling or {}).get("rope_type") == "llama3":
        tensors["rope_freqs.weight"] = torch.from_numpy(
            rope_divisors(cfg.rope_scaling, cfg.rope_theta, cfg.head_dim)).float()
    want, file_type = WRITES[type]
    data = {name: _quantize(name, t, getattr(gguf.GGMLQuantizationType, want),
                            tied=cfg.tie_embeddings) for name, t in tensors.items()}
    vocab = tokenizer_out(run.dir / "tokenizer.json", text_cfg, cfg.vocab_size)
    meta = {"general.name": run.dir.name,
            "general.file_type": int(getattr(gguf.LlamaFileType, file_type)),
            "general.quantization_version": gguf.GGML_QUANT_VERSION,
            **metadata_out(family, config, cfg, vocab)}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: write_gguf(tmp, family.arch, meta, data))
    return out


def write_gguf(path: Path, arch: str, meta: dict, data: dict) -> None:
    """A GGUF file of key/values `meta` and tensors `data` ({name: (array, type)})."""
    import gguf

    class Writer(gguf.GGUFWriter):
        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == gguf.GGUFValueType.ARRAY and isinstance(val, list) and not val:
                # an empty array (a character vocabulary's merges), which gguf's writer
                # refuses: its type, the element type, then a count of 0
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    writer = Writer(path, arch)
    try:
        for key, value in meta.items():
            _add(writer, key, value)
        for name, (array, qtype) in data.items():
            writer.add_tensor(name, array, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def metadata_out(family: Family, config: dict, cfg, vocab: dict) -> dict:
    """The {arch}.* keys from config.json by the family's table, then the tokenizer's."""
    p = family.arch + "."
    meta = {p + k: config[hf] for k, hf in family.keys}
    if family.arch != "gpt2":
        meta[p + "rope.dimension_count"] = cfg.head_dim
        meta[p + "vocab_size"] = cfg.vocab_size
        if (cfg.rope_scaling or {}).get("rope_type") == "linear":
            meta[p + "rope.scaling.type"] = "linear"
            meta[p + "rope.scaling.factor"] = float(cfg.rope_scaling["factor"])
    return {**meta, **vocab}


def _add(writer, key: str, value) -> None:
    import gguf
    if isinstance(value, list) and not value:  # add_array would leave the key out
        writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
        return
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def _quantize(name: str, t: torch.Tensor, want, tied: bool):
    """(bytes or floats, type) of one tensor: F32 for 1-D tensors, norms, positions and biases
    (llama.cpp's converter's rule); Q8_0 for the output layer under q4_0 (llama-quantize keeps
    it finer, Q6_K there); F16 where a row is not whole blocks (the converter's fallback)."""
    import gguf
    Q = gguf.GGMLQuantizationType
    array = t.detach().float().contiguous().numpy()
    qtype = want
    if array.ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or \
            name in ("position_embd.weight", "rope_freqs.weight"):
        qtype = Q.F32
    elif want == Q.Q4_0 and (name == "output.weight" or (tied and name == "token_embd.weight")):
        qtype = Q.Q8_0
    if qtype not in (Q.F32, Q.F16, Q.BF16) and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    return gguf.quants.quantize(array, qtype), qtype
