"""Where a model attends: the attention weights of any layer and head, drawn for each modality.

    A = softmax(Q K^T / sqrt(d_head) + M)         (one map per layer and head; rows sum to 1)

Every call of the trunk's `attention()` is recorded while the model runs on one input (q and
k after RoPE, the mask), and A is computed from them as attention_math computes it. The task
draws the map its own way (Task.draw_attention): text, a tokens x tokens map with the tokens as
labels and the likeliest next tokens at each position; images, the class token's attention
over the patches, drawn over the image; speech, the attention over the audio's frames under
its spectrogram; series, the attention over the look-back's patches under the series; any
other task, the map itself.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ..core import attention as attention_module
from ..core.attention import recorded_attention
from ..errors import ConfigError
from ..train.plots import save_figure


def attention_weights(q, k, mask=None, is_causal=False) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + M) for q (B, H, Tq, d), k (B, Hkv, Tk, d): (B, H, Tq, Tk)."""
    if q.size(1) != k.size(1):  # grouped-query heads: each K head serves several q heads
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if is_causal:
        scores = scores.masked_fill(~attention_module.causal_mask(q.size(2), k.size(2)),
                                    float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1).nan_to_num(0.0)


def pick(calls, layer: int | None, head: int | None) -> tuple[torch.Tensor, int, str]:
    """The (Tq, Tk) map of `layer` (default: the last; negative counts from the end) and
    `head` (default: the mean over heads) of the first sequence, with the layer index and a
    description of the head."""
    if not calls:
        raise ConfigError("the model made no attention call on this input")
    n = len(calls)
    index = n - 1 if layer is None else layer
    if not -n <= index < n:
        raise ConfigError(f"--layer {layer} is invalid: the model has {n} attention layers "
                          f"(0..{n - 1})")
    index %= n
    weights = attention_weights(*calls[index])[0]  # (H, Tq, Tk)
    if head is None:
        return weights.mean(0), index, f"mean of {weights.size(0)} heads"
    if not 0 <= head < weights.size(0):
        raise ConfigError(f"--head {head} is invalid: layer {index} has {weights.size(0)} heads "
                          f"(0..{weights.size(0) - 1})")
    return weights[head], index, f"head {head}"


def explain(run, source, *, layer: int | None = None, head: int | None = None,
            out: str | Path | None = None, top_k: int = 5) -> dict:
    """Draw `run`'s attention on one input into `out` (default RUN/plots/): the task reads
    `source` (a prompt for text, a file for the others), runs its model on it while every
    attention() call is recorded, and draws the chosen map its own way (Task.draw_attention).
    Returns what was drawn: the layer, the head, the map and the task's figures."""
    task = run.task
    out = Path(out) if out is not None else run.dir / "plots"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the PNG")
    item = task.read(source)
    args = task.attention_inputs(item)
    with torch.no_grad(), recorded_attention() as calls:
        outputs = run.model.eval()(*args)
    weights, index, which = pick(calls, layer, head)
    fig, figures = task.draw_attention(item, weights, outputs, f"layer {index}, {which}",
                                       top_k=top_k)
    is_file = isinstance(source, (str, Path)) and Path(source).is_file()
    stem = Path(source).stem if is_file else task.name
    plot = save_figure(fig, out / f"attention_{stem}_layer{index}.png")
    return {"task": task.name, "layer": index, "head": which, **figures, "plot": str(plot)}
