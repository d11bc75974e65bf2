"""monotile explain: attention maps for each modality, and the budget of parameters, FLOPs and
memory checked against PyTorch's FLOP counter and a real training step."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import monotile
from monotile.data import find_data
from monotile.explain.budget import budget, sample_input
from monotile.explain.maps import attention_weights
from monotile.train.optim import make_optimizer

from conftest import cli

SMALL = {"n_layer": "2", "n_head": "2", "d_model": "32", "d_ff": "64", "max_steps": "2",
         "eval_interval": "2", "log_interval": "1", "warmup_steps": "1", "seed": "0", "ema": "0"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    root = tmp_path_factory.mktemp("explain")
    return {"text": monotile.load(tiny_run.dir),
            "vision": monotile.train("vision", "digits", out=root / "vision", quiet=True,
                                     overrides=SMALL),
            "speech": monotile.train("speech", "fsdd", out=root / "speech", quiet=True,
                                     overrides=dict(SMALL, batch_size="4")),
            "series": monotile.train("series", "etth1", out=root / "series", quiet=True,
                                     overrides=dict(SMALL, lookback="96", horizon="24",
                                                    batch_size="8"))}


def test_attention_weights_are_the_softmax_that_weighs_the_values():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    a = attention_weights(q, k, is_causal=True)
    assert torch.allclose(a.sum(-1), torch.ones(2, 4, 5))
    assert (a.triu(1) == 0).all()  # no query sees a later key
    expected = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1),
                                              v.repeat_interleave(2, 1), is_causal=True)
    torch.testing.assert_close(a @ v.repeat_interleave(2, 1), expected)


@pytest.mark.parametrize("kind", ["text", "vision", "speech", "series"])
def test_the_budget_counts_the_flops_pytorch_counts(runs, kind):
    run = runs[kind]
    b = budget(run, batch=2)
    args, T = sample_input(run, 2, None)
    # FlopCounterMode has no formula for the CPU's fused attention kernel: use the written-out
    # attention (the same products) so that it sees every multiplication
    model = run.task.build_model(run.configs["model"].replace(attention="math"))
    model.load_state_dict(run.model.state_dict())
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model.eval()(*args)
    with FlopCounterMode(display=False) as step:
        out = model.train()(*args)
        (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()
    tokens = 2 * T
    assert b["total"]["forward_flops"] == pytest.approx(forward.get_total_flops() / tokens,
                                                        rel=0.05)
    assert b["total"]["training_flops"] == pytest.approx(step.get_total_flops() / tokens,
                                                         rel=0.05)


@pytest.mark.parametrize("kind", ["text", "vision", "speech", "series"])
def test_the_budget_holds_what_a_training_step_holds(runs, kind):
    run = runs[kind]
    b = budget(run, batch=8)
    args, _ = sample_input(run, 8, None)
    model = run.model.train()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def keep(t):  # every tensor autograd keeps for backward, each storage once
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t
    opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model(*args)
        loss = (out[0] if isinstance(out, tuple) else out).float().square().mean()
    loss.backward()
    opt.step()
    held = {"weights": sum(p.numel() * 4 for p in model.parameters()),
            "gradients": sum(p.grad.numel() * 4 for p in model.parameters()
                             if p.grad is not None),
            "adamw": sum(v.numel() * 4 for st in opt.state.values() for k, v in st.items()
                         if k != "step"),
            "activations": sum(saved.values())}
    model.zero_grad(set_to_none=True)
    for name in ("weights", "gradients", "adamw"):
        assert b["total"][f"{name}_fp32"] == held[name], name
    assert b["total"]["activations_fp32"] == pytest.approx(held["activations"], rel=0.2)
    assert b["total"]["weights_bf16"] * 2 == b["total"]["weights_fp32"]


def test_explain_draws_each_modality_and_refuses_bad_input(runs, tmp_path):
    text = cli("explain", str(runs["text"].dir), "ROMEO: what say you?", "--out",
               str(tmp_path), "--json", "--head", "1")
    assert text.returncode == 0, text.stderr
    shown = json.loads(text.stdout)
    assert shown["head"] == "head 1" and (tmp_path / "attention_text_layer1.png").stat().st_size
    a = torch.tensor(shown["attention"])
    assert torch.allclose(a.sum(-1), torch.ones(len(a)), atol=1e-5) and (a.triu(1) == 0).all()
    for row in shown["next_tokens"]:
        probs = [t["probability"] for t in row["top"]]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    from PIL import Image
    from sklearn.datasets import load_digits
    png = tmp_path / "digit.png"
    Image.fromarray((load_digits().images[0] * 16).astype("uint8")).save(png)
    wav = find_data("fsdd/recordings") / "3_theo_0.wav"
    csv = find_data("ett/ETTh1.csv")
    for kind, item in (("vision", png), ("speech", wav), ("series", csv)):
        done = cli("explain", str(runs[kind].dir), str(item), "--out", str(tmp_path), "--json")
        assert done.returncode == 0, done.stderr
        assert (tmp_path / f"attention_{item.stem}_layer1.png").stat().st_size > 1000
    # the wrong modality, a layer or head that is not there, a budget past the context
    for args, message in ((("vision", str(wav)), "not a readable image"),
                          (("speech", str(png)), "audio"),
                          (("text", str(png)), "this is a text run"),
                          (("text", "hello", "--layer", "7"), "--layer 7 is invalid"),
                          (("text", "hello", "--head", "9"), "--head 9 is invalid"),
                          (("text", "--budget", "--context", "999"), "longer than the model's")):
        done = cli("explain", str(runs[args[0]].dir), *args[1:], "--out", str(tmp_path))
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


def test_the_budget_table_on_the_command_line(runs):
    done = cli("explain", str(runs["text"].dir), "--budget", "--batch", "4", "--context", "16")
    assert done.returncode == 0, done.stderr
    assert "attention" in done.stdout and "a training step holds" in done.stdout
    figures = json.loads(cli("explain", str(runs["text"].dir), "--budget", "--json").stdout)
    assert figures["total"]["parameters"] == runs["text"].parameters()


# ---- a preset's budget and its plan for GPUs (no run, the model on the meta device) ----------

SMALL_GPT = {"n_layer": "2", "n_head": "2", "d_model": "32", "context": "16", "vocab_size": "64"}


def test_a_presets_budget_counts_the_recomputed_blocks_flops_pytorch_counts():
    from monotile.explain.budget import preset_budget
    from monotile.modalities.text import LanguageModel as ConfigModel
    b, meta, _ = preset_budget("gpt2-124m", dict(SMALL_GPT, activation_checkpointing="1"),
                               batch=2)
    assert {p.device.type for p in meta.parameters()} == {"meta"}
    model = ConfigModel(meta.trunk.cfg.replace(attention="math")).train()  # counted matmuls
    with FlopCounterMode(display=False) as step:
        model(torch.randint(64, (2, 16))).float().square().mean().backward()
    assert b["total"]["training_flops"] == pytest.approx(step.get_total_flops() / 32, rel=0.05)
    plain, _, _ = preset_budget("gpt2-124m", SMALL_GPT, batch=2)
    blocks = sum(plain["components"][c]["forward_flops"] for c in ("attention", "mlp"))
    # every block runs its forward again in backward but for its MLP's output projection
    # (2 h d a token), whose output backward does not need: the recompute stops before it
    assert b["total"]["training_flops"] - plain["total"]["training_flops"] == \
        pytest.approx(blocks - 2 * 2 * 128 * 32)


def test_the_plan_for_gpt2_124m_follows_nanogpts_flops_and_the_gpus_peak():
    from transformers import GPT2Config, GPT2LMHeadModel

    from monotile.explain.budget import plan, preset_budget
    b, model, train_cfg = preset_budget("gpt2-124m")
    with torch.device("meta"):
        n = GPT2LMHeadModel(GPT2Config(vocab_size=50304)).num_parameters()
    assert b["total"]["parameters"] == n == 124_475_904
    # nanoGPT's estimate_mfu: 6 N + 12 L H Q T a token, N without the position embeddings
    L, H, Q, T, d, h = 12, 12, 64, 1024, 768, 3072
    nanogpt = 6 * (n - T * d) + 12 * L * H * Q * T
    p = plan(b, model, train_cfg, gpus=8, gpu="h100")
    assert p["training_flops_per_token"] == pytest.approx(nanogpt, rel=0.005)
    assert p["step_seconds"] == pytest.approx(524_288 * nanogpt / (8 * 989e12 * 0.40), rel=0.005)
    m = p["memory_per_gpu"]
    assert (m["weights"], m["gradients"], m["adamw_moments"]) == (4 * n, 4 * n, 8 * n)  # ddp
    assert p["rows_per_gpu"] == 8 and p["activations_dtype"] == "bfloat16"
    # checkpointing every block: L - 1 blocks' activations go (one is rebuilt at a time), and
    # each block's input stays; bf16, 8 rows of T tokens on each GPU
    b1, model1, _ = preset_budget("gpt2-124m", {"activation_checkpointing": "1"})
    p1 = plan(b1, model1, train_cfg, gpus=8, gpu="h100")
    saved = 2 * 8 * T * ((L - 1) * (8 * d + 2 * h) - L * d)
    assert m["activations"] - p1["memory_per_gpu"]["activations"] == pytest.approx(saved)
    assert p1["step_seconds"] > p["step_seconds"]  # the recomputed forward passes


def test_a_plan_refuses_what_the_gpus_cannot_run():
    from monotile.errors import ConfigError
    from monotile.explain.budget import plan, preset_budget
    b, model, train_cfg = preset_budget("gpt2-124m", SMALL_GPT)
    for options, message in ((dict(gpu="v100"), "--gpu 'v100' is not known"),
                             (dict(gpus=3), "does not split evenly over 3"),
                             (dict(mfu=1.5), "--mfu 1.5 is invalid"),
                             (dict(gpu="h100", peak_tflops=900), "not both")):
        with pytest.raises(ConfigError, match=message):
            plan(b, model, train_cfg, **options)
    for name, overrides, message in (("shakespeare-char", {}, "sizes its model from its data"),
                                     ("gpt2-124m", {"n_layer": "0"}, "n_layer=0 is invalid"),
                                     ("gpt-2", {}, "unknown preset")):
        with pytest.raises(ConfigError, match=message):
            preset_budget(name, overrides)


def test_explain_plans_a_preset_on_gpus_without_a_run():
    done = cli("explain", "--preset", "gpt2-124m", "--budget", "--gpus", "8", "--gpu", "H100",
               "--json")
    assert done.returncode == 0, done.stderr
    b = json.loads(done.stdout)
    assert b["preset"] == "gpt2-124m" and b["total"]["parameters"] == 124_475_904
    assert b["plan"]["gpus"] == 8 and b["plan"]["step_seconds"] > 0
    for args, message in ((["--preset", "gpt2-124m"], "add --budget"),
                          (["--budget", "--gpu", "v100", "--preset", "gpt2-124m"],
                           "is not known")):
        done = cli("explain", *args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)
