"""Scaling laws, measured: train a grid of model sizes N and training lengths D, fit

    L(N, D) = E + A / N^alpha + B / D^beta                       (Hoffmann et al. 2022)

to the validation losses, and predict a larger model's loss before training it.

N counts the parameters of the trunk (the embedding and head excluded, as Kaplan et al. 2020
count them), D the training tokens. E is the loss no model reaches (the text's own entropy
under this tokenizer), A / N^alpha what a finite model misses, B / D^beta what finite data
misses. The fit is Chinchilla's: minimise the Huber loss (delta 1e-3) of
log L(N, D) - log L_measured over (log A, log B, log E, alpha, beta) with L-BFGS, from a grid of
starting points, keeping the best.

    monotile scaling --task text --preset speeches-bpe [--sizes 32,48,64,96]
                     [--tokens 250k,500k,1M] [--predict 128] [--out runs/scaling]
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np

from .errors import ConfigError

DEFAULT_SIZES = (32, 48, 64, 96)
DEFAULT_TOKENS = (250_000, 500_000, 1_000_000)
DEFAULT_PREDICT = 128


def law(N, D, E, A, B, alpha, beta):
    """L(N, D) = E + A / N^alpha + B / D^beta."""
    return E + A / np.power(N, alpha) + B / np.power(D, beta)


def fit_law(N, D, L, delta: float = 1e-3) -> dict:
    """The constants of L(N, D) that fit the measured losses L best (see the module docstring)."""
    from scipy.optimize import minimize
    from scipy.special import huber
    N, D, L = (np.asarray(v, dtype=np.float64) for v in (N, D, L))
    if len(L) < 3:
        raise ConfigError(f"{len(L)} runs cannot fit a scaling law; give at least 2 sizes and "
                          "2 token budgets")
    logN, logD, logL = np.log(N), np.log(D), np.log(L)

    def objective(x):  # the Huber loss and its gradient
        a, b, e, alpha, beta = x
        terms = np.stack([a - alpha * logN, b - beta * logD, np.full_like(logN, e)])
        pred = np.logaddexp.reduce(terms, axis=0)  # log(A/N^a + B/D^b + E), computed stably
        r = pred - logL
        slope = np.clip(r, -delta, delta)  # d huber / d r
        w = np.exp(terms - pred)  # d pred / d (a, b, e): each term's share
        grad = [(slope * w[0]).sum(), (slope * w[1]).sum(), (slope * w[2]).sum(),
                -(slope * w[0] * logN).sum(), -(slope * w[1] * logD).sum()]
        return huber(delta, r).sum(), np.array(grad)

    best = None
    for a, b, e, alpha, beta in itertools.product((0, 5, 10), (0, 5, 10), (-1, 0.5),
                                                  (0.2, 0.6), (0.2, 0.6)):
        r = minimize(objective, [a, b, e, alpha, beta], method="L-BFGS-B", jac=True,
                     bounds=[(-10, 30), (-10, 30), (-5, 5), (0, 2), (0, 2)])
        if best is None or r.fun < best.fun:
            best = r
    a, b, e, alpha, beta = best.x
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": alpha,
            "beta": beta, "huber": float(best.fun)}


def parse_tokens(text: str) -> int:
    """"500k", "2M", "1.5e6" -> a number of tokens."""
    t = text.strip().lower()
    scale = {"k": 1e3, "m": 1e6, "b": 1e9}.get(t[-1:], 1)
    try:
        value = float(t[:-1] if t[-1:] in "kmb" else t) * scale
    except ValueError:
        raise ConfigError(f"--tokens {text!r} is not a number of tokens; write e.g. 500k or "
                          "2M") from None
    if value <= 0:
        raise ConfigError(f"--tokens {text!r} is invalid: give a positive number of tokens")
    return int(value)


def trunk_parameters(model) -> int:
    return sum(p.numel() for p in model.trunk.parameters())


def sweep(preset: str, *, sizes=DEFAULT_SIZES, tokens=DEFAULT_TOKENS,
          predict: int | None = DEFAULT_PREDICT, out: str | Path = "runs/scaling",
          data: str | None = None, overrides: dict | None = None, quiet: bool = True,
          progress=print) -> dict:
    """Train `preset` (a text preset) at each width in `sizes` for each budget in `tokens`,
    fit L(N, D), plot it, and, with `predict`, train that width on the largest budget and
    compare the prediction with the measurement. Finished runs in `out` are reused."""
    from . import presets as preset_table
    from .run import train
    spec = preset_table.PRESETS.get(preset)
    if spec is None or "context" not in spec["model"]:
        raise ConfigError(f"scaling sweeps presets of sequence models with a context (tokens "
                          f"per step = batch x context), as the text ones; {preset!r} is not "
                          "one (see `monotile presets`)")
    sizes, tokens = sorted(set(sizes)), sorted(set(tokens))
    if len(sizes) < 2 or len(tokens) < 2:
        raise ConfigError("a sweep needs at least 2 sizes and 2 token budgets to separate N "
                          "from D")
    base = {**spec["model"], **spec["train"], **(overrides or {})}
    heads = int(base.get("n_head", 4))
    for d in sizes + ([predict] if predict else []):
        if d <= 0 or d % heads or (d // heads) % 2:
            raise ConfigError(f"size {d} is invalid: a width must be a positive multiple of "
                              f"2 x n_head = {2 * heads}")
    per_step = int(base.get("batch_size", 16)) * int(base.get("context", 128))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)

    def one(d: int, budget: int) -> dict:
        folder = out / f"d{d}-{budget}"
        done = folder / "scaling.json"
        if done.is_file():
            return json.loads(done.read_text())
        steps = max(1, round(budget / per_step))
        settings = {**(overrides or {}), "d_model": str(d), "max_steps": str(steps),
                    "eval_interval": str(steps), "warmup_steps": str(min(100, steps // 10 + 1))}
        progress(f"training d_model={d} for {steps} steps ({steps * per_step:,} tokens)")
        run = train(spec["task"], preset, out=folder, data=data, overrides=settings,
                    quiet=quiet)
        if "val_loss" not in run.state["last_eval"]:
            raise ConfigError(f"scaling fits a validation loss, and {spec['task']} runs report "
                              "none (val_loss)")
        row = {"d_model": d, "N": trunk_parameters(run.model), "D": steps * per_step,
               "val_loss": run.state["last_eval"]["val_loss"], "run": str(folder)}
        done.write_text(json.dumps(row))
        return row

    rows = [one(d, b) for d in sizes for b in tokens]
    fit = fit_law([r["N"] for r in rows], [r["D"] for r in rows], [r["val_loss"] for r in rows])
    result = {"preset": preset, "runs": rows, "fit": fit}
    if predict:
        from .core.transformer import Transformer
        from .run import load
        cfg = load(rows[0]["run"]).configs["model"].replace(d_model=predict)  # the same recipe
        n = sum(p.numel() for p in Transformer(cfg).parameters())
        expected = float(law(n, tokens[-1], **{k: fit[k] for k in ("E", "A", "B", "alpha",
                                                                   "beta")}))
        progress(f"predicted for d_model={predict} (N={n:,}): val loss {expected:.4f}")
        measured = one(predict, tokens[-1])
        result["prediction"] = {"d_model": predict, "N": measured["N"], "D": measured["D"],
                                "predicted": expected, "measured": measured["val_loss"],
                                "error": (expected - measured["val_loss"]) / measured["val_loss"]}
    result["plot"] = str(plot_law(out / "scaling.png", result))
    (out / "scaling.json").write_text(json.dumps(result, indent=1))
    return result


def plot_law(path: Path, result: dict) -> Path:
    """Loss against training tokens, one colour per size: the measured points and the fitted
    curves; the prediction as a star."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fit = {k: result["fit"][k] for k in ("E", "A", "B", "alpha", "beta")}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    runs = result["runs"] + ([result["prediction"] | {"val_loss": result["prediction"]
                                                      ["measured"]}]
                             if "prediction" in result else [])
    d_all = np.array([r["D"] for r in runs], dtype=float)
    grid = np.geomspace(d_all.min() / 1.5, d_all.max() * 1.5, 100)
    for i, n in enumerate(sorted({r["N"] for r in runs})):
        color = plt.cm.viridis(i / max(1, len({r["N"] for r in runs}) - 1))
        points = [r for r in runs if r["N"] == n]
        ax.scatter([r["D"] for r in points], [r["val_loss"] for r in points], color=color,
                   zorder=3)
        ax.plot(grid, law(n, grid, **fit), color=color, label=f"N = {n / 1e6:.2f}M")
    if "prediction" in result:
        p = result["prediction"]
        ax.scatter([p["D"]], [p["predicted"]], marker="*", s=160, color="crimson", zorder=4,
                   label=f"predicted {p['predicted']:.3f} (measured {p['measured']:.3f})")
    ax.set_xscale("log")
    ax.set_xlabel("training tokens D")
    ax.set_ylabel("validation loss")
    ax.set_title(f"L = {fit['E']:.2f} + {fit['A']:.3g}/N^{fit['alpha']:.2f} + "
                 f"{fit['B']:.3g}/D^{fit['beta']:.2f}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
