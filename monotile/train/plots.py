"""Plots of a run as PNG files in RUN/plots/ (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import atomic_write, read_metrics


def plot_loss_curve(run_dir: Path, metric: str) -> Path | None:
    """Training loss per logged step and the task's evaluation `metric` per evaluation (on a
    second axis unless it is itself a loss) -> plots/loss.png."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    evals = [(r["step"], r["eval"][metric]) for r in records
             if isinstance(r.get("eval"), dict) and metric in r["eval"]]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        eval_ax = ax if metric.endswith("loss") else ax.twinx()
        eval_ax.plot(*zip(*evals), "o-", color="C1", label=metric)
        if eval_ax is not ax:
            eval_ax.set_ylabel(metric)
            eval_ax.legend(loc="upper center")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    out = Path(run_dir) / "plots" / "loss.png"
    out.parent.mkdir(exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
    return out


def plot_confusion(run_dir: Path, cm, labels, unit: str = "images") -> Path:
    """A confusion matrix (rows: true class, columns: predicted) -> plots/confusion.png, with
    the counts written in the cells when there are at most 30 classes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(cm)
    k = len(labels)
    size = min(12, 3 + 0.45 * k)
    fig, ax = plt.subplots(figsize=(size, size), dpi=100)
    ax.imshow(cm, cmap="Blues")
    ticks = range(k) if k <= 60 else range(0, k, max(1, k // 30))
    ax.set_xticks(list(ticks), [labels[i] for i in ticks], rotation=90 if k > 12 else 0)
    ax.set_yticks(list(ticks), [labels[i] for i in ticks])
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title(f"{Path(run_dir).name}: accuracy {accuracy:.2%} on {cm.sum():,} {unit}")
    if k <= 30:
        top = cm.max() if cm.size else 0
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if cm[i, j] > top / 2 else "black")
    out = Path(run_dir) / "plots" / "confusion.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
    return out


def plot_forecast(out: Path, panels: list, quantiles) -> Path:
    """Per series (name, history x, history, forecast x, quantiles (H, Q)): the history, the
    median forecast and the band between the outermost quantiles, one panel per series (at
    most 8) -> `out` (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = min(len(panels), 8)
    fig, axes = plt.subplots(k, 1, figsize=(9, 2.4 * k + 0.6), dpi=100, squeeze=False)
    median = list(quantiles).index(0.5)
    for ax, (name, x_hist, history, x_future, q) in zip(axes[:, 0], panels):
        ax.plot(x_hist, history, lw=1, color="C0", label="history")
        ax.plot(x_future, q[:, median], lw=1.5, color="C1", label="median forecast")
        ax.fill_between(x_future, q[:, 0], q[:, -1], color="C1", alpha=0.25,
                        label=f"{quantiles[0]:.0%}-{quantiles[-1]:.0%} interval")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="upper left", fontsize=8)
    if len(panels) > k:
        axes[0, 0].set_title(f"the first {k} of {len(panels)} series")
    fig.autofmt_xdate()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", bbox_inches="tight"))
    plt.close(fig)
    return out


def figure(width: float, height: float, *, rows: int = 1, columns: int = 1, **options):
    """A matplotlib figure (Agg backend) of width x height inches and its axes: one, or an
    array of rows x columns."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt.subplots(rows, columns, figsize=(width, height), **options)


def save_figure(fig, path: Path, dpi: int = 110) -> Path:
    """Write `fig` as a PNG at `path` (atomically, its folder made) and close it."""
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    plt.close(fig)
    return path


def attention_heatmap(ax, weights, labels_q, labels_k, title: str) -> None:
    """An attention map (Tq, Tk), queries down and keys across, labelled when it is small."""
    ax.imshow(weights.numpy(), cmap="viridis", vmin=0, aspect="auto")
    ax.set_title(title, fontsize=9)
    if labels_k is not None and len(labels_k) <= 80:
        ax.set_xticks(range(len(labels_k)), labels_k, rotation=90, fontsize=7)
        ax.set_yticks(range(len(labels_q)), labels_q, fontsize=7)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query")
