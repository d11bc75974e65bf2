"""Run under torchrun by tests/test_distributed.py: train one FSDP2 step of a small model and
print, from the main process, the numbers of values this process holds (JSON)."""

import json

import torch
import torch.nn.functional as F

from monotile.core.transformer import ModelConfig, init_weights
from monotile.modalities.text import LanguageModel
from monotile.train import distributed
from monotile.train.optim import make_optimizer

ctx = distributed.setup("fsdp")
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=50, n_layer=3, n_head=2, d_model=32, context=16, bias=True)
model = LanguageModel(cfg)
init_weights(model, cfg.n_layer)
distributed.wrap(model, ctx)
opt = make_optimizer(model, lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.99)
x = torch.randint(0, 50, (4 // ctx.world, 16))
F.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
opt.step()
local = [p.to_local() for p in model.parameters()]
moments = [v.to_local() for st in opt.state.values() for k, v in st.items() if k != "step"]
if ctx.main:
    print(json.dumps({"weights": sum(t.numel() for t in local),
                      "gradients": sum(p.grad.to_local().numel() for p in model.parameters()),
                      "moments": sum(t.numel() for t in moments)}))
distributed.shutdown()
