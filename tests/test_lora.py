"""LoRA: the adapter's formula, frozen bases, fine-tuning runs on text and images, merging, and
the adapters in PEFT's layout, loaded by peft on the Hugging Face export of the base."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import monotile
from monotile.data import sha256
from monotile.core.lora import LoRALinear, add_lora, lora_tensors, merge_lora
from monotile.core.transformer import ModelConfig
from monotile.modalities.text import LanguageModel

from conftest import cli, set_args


def test_lora_linear_is_w_x_plus_scaled_b_a_x():
    torch.manual_seed(0)
    base = nn.Linear(6, 5)
    layer = LoRALinear(base, rank=2, alpha=4.0)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 6)
    A, B, W, b = layer.lora_A, layer.lora_B, base.weight, base.bias
    expected = x @ W.T + b + (4.0 / 2) * (x @ A.T @ B.T)
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.delta_weight(), 2.0 * B @ A)


def test_an_adapter_on_some_rows_changes_only_those_rows():
    torch.manual_seed(0)
    base = nn.Linear(4, 6, bias=False)
    rows = torch.tensor([0, 1, 4, 5])
    layer = LoRALinear(base, rank=2, alpha=2.0, rows=rows)
    nn.init.normal_(layer.lora_B)
    x = torch.randn(3, 4)
    out, plain = layer(x), base(x)
    torch.testing.assert_close(out[:, [2, 3]], plain[:, [2, 3]])
    torch.testing.assert_close(out[:, rows], plain[:, rows] + x @ layer.lora_A.T @ layer.lora_B.T)


def small_lm(seed=0):
    torch.manual_seed(seed)
    return LanguageModel(ModelConfig(vocab_size=20, n_layer=2, n_head=4, n_kv_head=2,
                                     d_model=16, context=8, bias=False))


def test_only_adapters_train_and_q_v_targets_adapt_those_rows_of_qkv():
    model = small_lm()
    x = torch.randint(0, 20, (2, 8))
    before = model(x)
    adapted = add_lora(model, rank=2, alpha=2.0, targets=["q", "v", "fc2"])
    assert adapted == ["trunk.blocks.0.attn.qkv", "trunk.blocks.0.mlp.fc2",
                       "trunk.blocks.1.attn.qkv", "trunk.blocks.1.mlp.fc2"]
    torch.testing.assert_close(model(x), before)  # B = 0: the base model exactly
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora_tensors(model))
    qkv = model.trunk.blocks[0].attn.qkv
    # 4 query heads and 2 value heads of 4 dims: 16 + 8 rows of the 32 in q|k|v
    assert qkv.lora_B.shape == (24, 2) and qkv.rows.tolist() == list(range(16)) + \
        list(range(24, 32))
    assert sum(p.numel() for p in lora_tensors(model).values()) == \
        2 * (2 * (16 + 24) + 2 * (64 + 16))


def test_merged_weights_give_the_adapted_logits():
    model = small_lm()
    add_lora(model, rank=4, alpha=8.0, targets=["qkv", "wo", "fc1", "fc2"])
    with torch.no_grad():
        for p in lora_tensors(model).values():
            p.normal_(0, 0.2)
    x = torch.randint(0, 20, (3, 8))
    adapted = model(x)
    merge_lora(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(small_lm().state_dict())
    torch.testing.assert_close(model(x), adapted, atol=1e-5, rtol=1e-5)


def test_targets_that_match_no_layer_or_a_tied_head_are_refused():
    with pytest.raises(monotile.MonotileError, match="matches no linear layer.*qkv"):
        add_lora(small_lm(), rank=2, alpha=2.0, targets=["q_proj"])
    with pytest.raises(monotile.MonotileError, match="shares its weight"):
        add_lora(small_lm(), rank=2, alpha=2.0, targets=["head"])


@pytest.fixture(scope="module")
def speeches(tmp_path_factory):
    """60,000 characters of the public-domain speeches: new text for a Shakespeare model."""
    from monotile.data import find_data
    text = find_data("speeches/speeches_public_domain.txt").read_text(encoding="utf-8")
    path = tmp_path_factory.mktemp("speeches") / "speeches_60k.txt"
    path.write_text(text[:60_000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def shakespeare_run(tmp_path_factory, small_text):
    """A small character model that has learnt some Shakespeare (300 steps, ~6 s)."""
    out = tmp_path_factory.mktemp("lora") / "base"
    return monotile.train("text", "shakespeare-char", out=out, data=small_text, quiet=True,
                          overrides={"n_layer": "2", "n_head": "2", "d_model": "32",
                                     "context": "32", "batch_size": "8", "max_steps": "300",
                                     "eval_interval": "300", "warmup_steps": "5", "lr": "3e-3",
                                     "eval_tokens": "2000", "seed": "0"})


def test_finetune_a_text_run_on_other_text_then_merge(shakespeare_run, speeches, tmp_path):
    tiny_run = shakespeare_run
    base_file = tiny_run.dir / "model.safetensors"
    base_sha = sha256(base_file)
    out = tmp_path / "ft"
    done = cli("finetune", str(tiny_run.dir), "--data", str(speeches), "--lora-rank", "4",
               "--out", str(out), "--json",
               *set_args({"max_steps": "100", "eval_interval": "50", "lr": "1e-2"}))
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert 0 < figures["trainable_parameters"] < 0.2 * figures["parameters"]
    # held-out speeches: the adapted model predicts them better than its base (2.46 -> 2.36)
    assert figures["val_loss"] < figures["before"]["val_loss"] - 0.03
    assert sha256(base_file) == base_sha  # the base is untouched
    adapter = load_file(str(out / "adapter.safetensors"))
    assert set(adapter) == set(load_file(str(out / "model.safetensors")))
    assert all(".lora_" in name for name in adapter)
    assert sum(t.numel() for t in adapter.values()) == figures["trainable_parameters"]
    assert not (out / "peft").exists()  # a character model has no Hugging Face architecture

    ft = monotile.load(out)
    assert ft.evaluate()["val_loss"] == pytest.approx(figures["val_loss"], rel=1e-6)
    merged_dir = tmp_path / "merged"
    assert cli("merge", str(tiny_run.dir), str(out), "--out", str(merged_dir)).returncode == 0
    merged = monotile.load(merged_dir)
    x = torch.randint(0, ft.task.tokenizer.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x), ft.model(x), atol=1e-5, rtol=1e-5)
    options = dict(max_new_tokens=40, temperature=0.0)
    assert merged.generate("The ", **options) == ft.generate("The ", **options)


def test_an_adapter_is_refused_by_another_base_and_nothing_is_written(tiny_run, speeches,
                                                                      small_text, tmp_path):
    other = monotile.train("text", "shakespeare-char", out=tmp_path / "other", data=small_text,
                           overrides={"n_layer": "2", "n_head": "2", "d_model": "32",
                                      "context": "32", "max_steps": "2", "eval_interval": "2",
                                      "eval_tokens": "500", "seed": "1"}, quiet=True)
    ft = tmp_path / "ft"
    assert cli("finetune", str(tiny_run.dir), "--data", str(speeches), "--out", str(ft),
               "--quiet", *set_args({"max_steps": "2", "eval_interval": "2"})).returncode == 0
    done = cli("merge", str(other.dir), str(ft), "--out", str(tmp_path / "m"))
    assert done.returncode == 2 and "trained on another base model" in done.stderr
    assert not (tmp_path / "m").exists()
    done = cli("finetune", str(tiny_run.dir), "--data", str(speeches), "--lora-targets",
               "q_proj,v_proj", "--out", str(tmp_path / "bad"))
    assert done.returncode == 2 and "matches no linear layer" in done.stderr
    assert not (tmp_path / "bad").exists()
    done = cli("finetune", str(tiny_run.dir), "--data", str(speeches), "--out",
               str(tmp_path / "bad"), "--set", "n_layer=6")
    assert done.returncode == 2 and "shape" in done.stderr


def test_finetune_an_image_classifier_on_other_images(tmp_path):
    from monotile.data import find_data
    tiny = {"n_layer": "2", "n_head": "2", "d_model": "32", "d_ff": "64", "batch_size": "32",
            "max_steps": "40", "eval_interval": "40", "warmup_steps": "5", "lr": "3e-3",
            "ema": "0", "seed": "0", "image_size": "16"}
    base = monotile.train("vision", "digits", out=tmp_path / "digits", overrides=tiny,
                          quiet=True)
    pngs = find_data("mnist/test_png_sample")  # 300 real MNIST digits in class folders
    ft = monotile.adapt.finetune(base.dir, pngs, rank=4, out=tmp_path / "ft",
                                 targets=["qkv", "fc1"], quiet=True,
                                 overrides={"max_steps": "20", "eval_interval": "20",
                                            "ema": "0.9"})
    assert ft.state["trainable_parameters"] == 2 * (4 * (32 + 96) + 4 * (32 + 64))
    assert set(ft.state["last_eval"]) >= {"accuracy"}
    # with a moving average kept, load, eval, the adapter file and merge all use the average
    again = monotile.load(ft.dir)
    merged = monotile.merge(base.dir, ft.dir / "adapter.safetensors", out=tmp_path / "merged")
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(merged.model(x), again.model(x), atol=1e-5, rtol=1e-5)
    assert again.evaluate()["accuracy"] == ft.state["last_eval"]["accuracy"]


# ---- PEFT's layout ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_run(tmp_path_factory, small_text):
    """A Llama-shaped base (speeches-bpe: RoPE, RMSNorm, SwiGLU, 4 query heads on 2 key-value
    heads, fused qkv and gate_up), small and briefly trained."""
    out = tmp_path_factory.mktemp("llama") / "base"
    return monotile.train("text", "speeches-bpe", out=out, data=small_text, quiet=True,
                          overrides={"n_layer": "2", "d_model": "32", "context": "32",
                                     "bpe_vocab": "300", "max_steps": "20",
                                     "eval_interval": "20", "eval_tokens": "2000"})


@pytest.mark.parametrize("targets, modules", [
    (None, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    (["q", "v"], ["q_proj", "v_proj"])])  # q and v rows of the fused qkv: k_proj left out
def test_peft_loads_the_adapter_on_the_hf_export_and_gives_the_same_logits(
        llama_run, speeches, tmp_path, targets, modules):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from monotile.interop.hf import export_hf
    ft = monotile.finetune(llama_run.dir, speeches, rank=4, alpha=8.0, targets=targets,
                           out=tmp_path / "ft", quiet=True,
                           overrides={"max_steps": "30", "eval_interval": "30", "lr": "2e-2"})
    folder = ft.dir / "peft"
    config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
    assert {k: config[k] for k in ("peft_type", "task_type", "r", "lora_alpha", "bias",
                                   "fan_in_fan_out", "target_modules")} == {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "bias": "none",
        "fan_in_fan_out": False, "target_modules": modules}
    names = set(load_file(str(folder / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight" in names
    assert len(names) == 2 * 2 * len(modules)  # A and B for each module of the 2 blocks

    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(llama_run.dir,
                                                                     tmp_path / "hf")).eval()
    ids = torch.tensor([llama_run.task.tokenizer.encode("ROMEO: What say you, my lord?")])
    with torch.no_grad():
        base = hf(ids).logits
        ours = monotile.load(ft.dir).model.eval()(ids)
        theirs = peft.PeftModel.from_pretrained(hf, folder).eval()(ids).logits
    assert (ours - base).abs().max() > 0.05  # the adapter changes the logits...
    assert (theirs - ours).abs().max() <= 1e-4  # ...and peft changes them as monotile does


def test_a_gpt2_adapter_exported_with_its_base_loads_by_name(small_text, speeches, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from monotile.tokenizers import Tokenizer as BPE
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=320, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    gpt2.save_pretrained(tmp_path / "gpt2")
    BPE.train_bpe(small_text.read_text(encoding="utf-8")[:20_000], 300).tok.save(
        str(tmp_path / "gpt2" / "tokenizer.json"))
    assert cli("import", "hf", str(tmp_path / "gpt2"), "--out",
               str(tmp_path / "base")).returncode == 0
    done = cli("finetune", str(tmp_path / "base"), "--data", str(speeches), "--lora-rank", "4",
               "--lora-targets", "q,v,fc2", "--out", str(tmp_path / "ft"), "--quiet",
               *set_args({"max_steps": "20", "eval_interval": "20", "lr": "2e-2",
                          "batch_size": "8", "eval_tokens": "2000"}))
    assert done.returncode == 0, done.stderr
    assert cli("export", "hf", str(tmp_path / "base"), "--out",
               str(tmp_path / "hf")).returncode == 0
    done = cli("export", "peft", str(tmp_path / "ft"), "--out", str(tmp_path / "adapter"),
               "--base", str(tmp_path / "hf"))
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    # Conv1D layers; attn.c_proj (wo) is not adapted, so only the MLP's c_proj is named
    assert config["fan_in_fan_out"] is True
    assert config["target_modules"] == ["c_attn", "mlp.c_proj"]
    assert config["base_model_name_or_path"] == str(tmp_path / "hf")

    model = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = monotile.load(tmp_path / "ft").model.eval()(ids)
        base = monotile.load(tmp_path / "base").model.eval()(ids)
        theirs = model(ids).logits
    assert (ours - base).abs().max() > 0.05
    assert (theirs - ours).abs().max() <= 1e-4
    done = cli("export", "peft", str(tmp_path / "base"), "--out", str(tmp_path / "no"))
    assert done.returncode == 2 and "not a fine-tuning run" in done.stderr
