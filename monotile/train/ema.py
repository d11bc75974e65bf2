"""An exponential moving average of the weights, the model that is evaluated and kept.

    ema_t = d_t ema_{t-1} + (1 - d_t) theta_t,   d_t = min(decay, (1 + t) / (10 + t))

The warm-up of d_t (TensorFlow's ExponentialMovingAverage with num_updates) keeps the average
from remembering the random initialisation for thousands of steps.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A copy of `model` whose parameters follow the training weights' moving average."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        self.model.requires_grad_(False)

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in the weights after optimizer step `step` (0-based):
        ema += (1 - d)(theta - ema)."""
        ema = [p for p in self.model.parameters()]
        new = [p.detach() for p in model.parameters()]
        torch._foreach_lerp_(ema, new, 1.0 - self.decay_at(step))
