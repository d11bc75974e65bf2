"""The training loop, optimizer and schedule, on a real (tiny) Task of its own."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from monotile.core.transformer import ModelConfig
from monotile.modalities.text import LanguageModel
from monotile.train.optim import lr_at, make_optimizer, param_groups
from monotile.train.trainer import TrainConfig, fit


class RegressionTask:
    """y = x A + noise, batches cut in order from a fixed data set: any batch size or
    accumulation that covers the same rows sees the same data."""

    name = "regression"
    best_metric = ("val_mse", "min")

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 8, generator=g)
        self.y = self.x @ torch.randn(8, 2, generator=g) + 0.01 * torch.randn(64, 2, generator=g)

    def batches(self, split, rng, batch_size):
        i = 0
        while True:
            yield self.x[i:i + batch_size], self.y[i:i + batch_size]
            i = (i + batch_size) % 64

    def loss(self, model, batch):
        x, y = batch
        return F.mse_loss(model(x), y)

    def tokens(self, batch):
        return len(batch[0])

    def evaluate(self, model, progress=False):
        return {"val_mse": F.mse_loss(model(self.x), self.y).item()}


def linear():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 2))


def train(tmp_path, name, **cfg):
    model = linear()
    settings = dict(max_steps=20, lr=1e-2, min_lr=1e-3, warmup_steps=2, eval_interval=10,
                    log_interval=5, weight_decay=0.1, seed=0, device="cpu")
    settings.update(cfg)
    run = tmp_path / name
    run.mkdir()
    state = fit(RegressionTask(), model, TrainConfig(**settings), run, quiet=True)
    return model, state


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    big, _ = train(tmp_path, "big", batch_size=8, grad_accum=1)
    acc, _ = train(tmp_path, "acc", batch_size=4, grad_accum=2)
    for a, b in zip(big.parameters(), acc.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_the_loop_learns_and_keeps_the_best_checkpoint(tmp_path):
    model, state = train(tmp_path, "run", batch_size=8, lr=5e-2, max_steps=60)
    assert state["step"] == 60
    assert state["best"] < 0.5 * RegressionTask().evaluate(linear())["val_mse"]
    assert (tmp_path / "run" / "best.safetensors").exists()


def test_bf16_autocast_trains_on_cpu(tmp_path):
    _, state = train(tmp_path, "bf16", batch_size=8, dtype="bfloat16")
    assert math.isfinite(state["best"])


def test_weight_decay_skips_norms_biases_and_embeddings():
    model = LanguageModel(ModelConfig(vocab_size=30, n_layer=1, n_head=2, d_model=8,
                                      context=4, bias=True))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in decay["params"]} == {
        "trunk.blocks.0.attn.qkv.weight", "trunk.blocks.0.attn.wo.weight",
        "trunk.blocks.0.mlp.fc1.weight", "trunk.blocks.0.mlp.fc2.weight"}
    assert "tok_emb.weight" in {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0.0


def test_adamw_step_is_the_decoupled_update():
    torch.manual_seed(0)
    layer = nn.Linear(3, 2, bias=False)
    w0 = layer.weight.detach().clone()
    opt = make_optimizer(layer, lr=0.1, weight_decay=0.5, beta1=0.9, beta2=0.99, eps=1e-8)
    layer(torch.ones(1, 3)).sum().backward()
    g = layer.weight.grad.clone()
    opt.step()
    m, v = 0.1 * g, 0.01 * g ** 2                 # first step: (1 - b) g, (1 - b2) g^2
    m_hat, v_hat = m / (1 - 0.9), v / (1 - 0.99)  # bias correction
    expected = w0 * (1 - 0.1 * 0.5) - 0.1 * m_hat / (v_hat.sqrt() + 1e-8)
    torch.testing.assert_close(layer.weight.detach(), expected)


def test_schedule_is_linear_warmup_then_cosine_to_min_lr():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup=100, decay_steps=2000)
    assert lr_at(0, **kw) == pytest.approx(1e-5)
    assert lr_at(99, **kw) == pytest.approx(1e-3)
    for s in (100, 500, 1050, 1999):
        cosine = 1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * (s - 100) / 1900))
        assert lr_at(s, **kw) == pytest.approx(cosine)
    assert lr_at(2000, **kw) == lr_at(5000, **kw) == pytest.approx(1e-4)
    # the same curve as PyTorch's own CosineAnnealingLR after warmup
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1900, eta_min=1e-4)
    for s in range(100, 2000):
        assert lr_at(s, **kw) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-6)
        opt.step()
        sched.step()


@pytest.mark.parametrize("bad, message", [
    (dict(lr=-1.0), "lr=-1.0 is invalid"), (dict(max_steps=0), "max_steps=0 is invalid"),
    (dict(min_lr=1.0), "min_lr=1.0 is invalid"), (dict(dtype="fp8"), "dtype='fp8' is invalid"),
])
def test_invalid_train_settings_are_refused(bad, message):
    from monotile.errors import ConfigError
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**bad)
