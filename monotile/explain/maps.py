"""Where a model attends: the attention weights of any layer and head, drawn for each modality.

    A = softmax(Q K^T / sqrt(d_head) + M)         (one map per layer and head; rows sum to 1)

Every call of the trunk's `attention()` is recorded while the model runs on one input (q and
k after RoPE, the mask), and A is computed from them as attention_math computes it. Then:
text: a tokens x tokens map with the tokens as labels, and the likeliest next tokens at each
position; images: the class token's attention over the patches, drawn over the image; speech:
the attention over the audio's frames under its spectrogram; series: the attention over the
look-back's patches under the series.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from pathlib import Path

import torch

from ..core import attention as attention_module
from ..errors import ConfigError, DataError


@contextmanager
def recorded_attention():
    """Yield a list that fills with (q, k, mask, is_causal) for each attention() call made
    inside the block, in call order (block 0 first)."""
    calls = []
    original = attention_module.attention

    def record(q, k, v, *, mask=None, is_causal=False, impl="sdpa"):
        calls.append((q.detach().float(), k.detach().float(), mask, is_causal))
        return original(q, k, v, mask=mask, is_causal=is_causal, impl=impl)

    attention_module.attention = record
    try:
        yield calls
    finally:
        attention_module.attention = original


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


def explain(run, item: str, *, layer: int | None = None, head: int | None = None,
            out: str | Path | None = None, top_k: int = 5) -> dict:
    """Draw `run`'s attention on one input (a prompt for text, a file for the others) into
    `out` (default RUN/plots/); returns what was drawn and, for text, the top next tokens."""
    task = run.meta["task"]
    out = Path(out) if out is not None else run.dir / "plots"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file; give a folder for the PNG")
    out.mkdir(parents=True, exist_ok=True)
    model = run.model.eval()
    draw = {"text": _text, "vision": _vision, "speech": _speech, "series": _series}.get(task)
    if draw is None:
        raise ConfigError(f"explain does not support {task} runs")
    return draw(run, model, item, layer, head, out, top_k)


def _not_a_file(prompt: str) -> None:
    """A text run explains a prompt; a path to an image, a recording or a CSV is a mistake."""
    from ..modalities.audio import AUDIO_SUFFIXES
    from ..modalities.vision import IMAGE_SUFFIXES
    suffix = Path(prompt).suffix.lower()
    if suffix in IMAGE_SUFFIXES + AUDIO_SUFFIXES + (".csv",) and Path(prompt).is_file():
        raise DataError(f"{prompt} is a {suffix} file, and this is a text run: give it a "
                        "prompt, or explain the file with a run of its modality")


def _token_label(text: str) -> str:
    return repr(text)[1:-1] or "''"


def _heatmap(ax, weights, labels_q, labels_k, title):
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0, aspect="auto")
    ax.set_title(title, fontsize=9)
    if labels_k is not None and len(labels_k) <= 80:
        ax.set_xticks(range(len(labels_k)), labels_k, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels_q)), labels_q, fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return str(path)


def _text(run, model, prompt, layer, head, out, top_k):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    task = run.task
    tok = task.tokenizer
    _not_a_file(prompt)
    ids = tok.encode(prompt)
    if not ids:
        raise DataError("the text is empty; give at least one character the model knows")
    context = run.configs["model"].context
    if len(ids) > context:
        raise DataError(f"the text has {len(ids)} tokens, more than the context {context}; "
                        "give a shorter one")
    x = torch.tensor([ids])
    encoder = run.configs["text"].model == "encoder"
    with torch.no_grad(), recorded_attention() as calls:
        logits = model(x, torch.ones_like(x)) if encoder else model(x)
    weights, index, which = pick(calls, layer, head)
    labels = [_token_label(tok.decode([i])) for i in ids]
    size = min(14, 3 + 0.25 * len(ids))
    fig, ax = plt.subplots(figsize=(size, size))
    _heatmap(ax, weights, labels, labels, f"{run.dir.name}: layer {index}, {which}")
    result = {"task": "text", "layer": index, "head": which, "tokens": labels,
              "attention": weights.tolist(),
              "plot": _save(fig, out / f"attention_text_layer{index}.png")}
    if not encoder:
        probs = logits[0].float().softmax(-1)
        top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
        result["next_tokens"] = [
            {"position": t, "token": labels[t],
             "top": [{"token": _token_label(tok.decode([i])), "probability": p}
                     for i, p in zip(top.indices[t].tolist(), top.values[t].tolist())]}
            for t in range(len(ids))]
    return result


def _vision(run, model, path, layer, head, out, top_k):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    from ..modalities.vision import read_image
    c = run.configs["vision"]
    image = read_image(Path(path), c.channels, c.image_size, c.fit)  # uint8 (C, S, S)
    with torch.no_grad(), recorded_attention() as calls:
        logits = model(run.task.normalise(image[None]))
    weights, index, which = pick(calls, layer, head)
    grid = c.image_size // c.patch_size
    if c.pool == "cls":  # the class token's row, over the patches
        over, what = weights[0, 1:], "the class token's attention"
    else:  # no class token: the attention each patch receives, averaged over queries
        over, what = weights.mean(0), "mean attention received"
    heat = over.reshape(1, 1, grid, grid)
    heat = F.interpolate(heat, size=(c.image_size, c.image_size), mode="bilinear",
                         align_corners=False)[0, 0]
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    shown = image.permute(1, 2, 0).numpy()
    axes[0].imshow(shown.squeeze(-1) if c.channels == 1 else shown,
                   cmap="gray" if c.channels == 1 else None)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(shown.squeeze(-1) if c.channels == 1 else shown,
                   cmap="gray" if c.channels == 1 else None)
    axes[1].imshow(heat.numpy(), cmap="inferno", alpha=0.55)
    axes[1].set_title(f"layer {index}, {which}: {what}", fontsize=9)
    for ax in axes:
        ax.axis("off")
    probs = logits[0].float().softmax(-1)
    best = int(probs.argmax())
    return {"task": "vision", "layer": index, "head": which, "grid": [grid, grid],
            "attention": over.reshape(grid, grid).tolist(), "label": c.labels[best],
            "probability": float(probs[best]),
            "plot": _save(fig, out / f"attention_{Path(path).stem}_layer{index}.png")}


def _speech(run, model, path, layer, head, out, top_k):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..modalities.audio import read_audio
    c = run.configs["speech"]
    wave = read_audio(Path(path), c.sample_rate)[:int(c.max_seconds * c.sample_rate)]
    frames, lengths = run.task.features([wave])
    with torch.no_grad(), recorded_attention() as calls:
        model(frames, lengths)
    weights, index, which = pick(calls, layer, head)
    seconds = len(wave) / c.sample_rate
    fig, axes = plt.subplots(2, 1, figsize=(9, 6), sharex=True,
                             gridspec_kw={"height_ratios": [1, 2]})
    axes[0].imshow(frames[0].T.numpy(), origin="lower", aspect="auto", cmap="magma",
                   extent=(0, seconds, 0, c.n_mels))
    axes[0].set_ylabel("mel bin")
    axes[0].set_title(f"{Path(path).name}: log-mel frames", fontsize=9)
    axes[1].imshow(weights.numpy(), origin="lower", aspect="auto", cmap="viridis",
                   extent=(0, seconds, 0, seconds))
    axes[1].set_xlabel("key time (s)")
    axes[1].set_ylabel("query time (s)")
    axes[1].set_title(f"layer {index}, {which}", fontsize=9)
    return {"task": "speech", "layer": index, "head": which, "seconds": seconds,
            "tokens": weights.size(0), "attention": weights.tolist(),
            "plot": _save(fig, out / f"attention_{Path(path).stem}_layer{index}.png")}


def _series(run, model, path, layer, head, out, top_k):
    import dataclasses

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from ..modalities.series_io import fill_missing, read_table
    c = run.configs["series"]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; give a CSV of the history")
    _, table, _ = read_table(path, dataclasses.replace(c, target=() if c.revin else c.columns))
    name = next(iter(table))
    values = fill_missing(table[name])
    if len(values) < c.lookback or np.isnan(values).any():
        raise DataError(f"series {name!r} has {len(values)} values; the model looks back "
                        f"{c.lookback}: give at least that many")
    window = torch.tensor(values[-c.lookback:], dtype=torch.float32)[None]
    with torch.no_grad(), recorded_attention() as calls:
        model(window)
    weights, index, which = pick(calls, layer, head)
    received = weights.mean(0)  # how much each patch is attended to, over all queries
    starts = [i * c.stride for i in range(received.numel())]
    fig, axes = plt.subplots(2, 1, figsize=(9, 5), sharex=True,
                             gridspec_kw={"height_ratios": [2, 1]})
    axes[0].plot(range(c.lookback), window[0].numpy(), color="tab:blue")
    axes[0].set_title(f"{name}: the last {c.lookback} values", fontsize=9)
    axes[1].bar([s + c.patch_len / 2 for s in starts], received.numpy(), width=c.stride * 0.9,
                color="tab:orange")
    axes[1].set_xlabel("step of the look-back (patch centres)")
    axes[1].set_ylabel("attention")
    axes[1].set_title(f"layer {index}, {which}: attention each patch receives", fontsize=9)
    return {"task": "series", "layer": index, "head": which, "series": name,
            "patch_starts": starts, "attention_received": received.tolist(),
            "plot": _save(fig, out / f"attention_{path.stem}_layer{index}.png")}
