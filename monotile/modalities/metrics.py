"""The figures classifiers and recognisers are scored by, shared by the modalities.

Confusion:  C[i, j] = how many items of class i were predicted as class j
Per class:  precision_k = C_kk / sum_i C_ik, recall_k = C_kk / sum_j C_kj,
            F1_k = 2 P R / (P + R); 0 where a denominator is 0 (scikit-learn's zero_division=0)
Edit:       Levenshtein distance, D[i][j] = min(D[i-1][j] + 1, D[i][j-1] + 1,
            D[i-1][j-1] + [ref_i != hyp_j])
WER, CER:   word (character) edit distances / reference words (characters), pooled over the
            corpus as jiwer computes them
MASE:       mean |y - y_hat| / mean |x_t - x_(t-m)| (the in-sample seasonal naive error;
            Hyndman & Koehler 2006); sMAPE = mean 200 |y - y_hat| / (|y| + |y_hat|) (M4's)

tests/test_vision.py checks the per-class figures against scikit-learn, tests/test_speech.py
the error rates against jiwer, tests/test_series.py MASE and sMAPE against M4's own figures.
"""

from __future__ import annotations

import torch
from rapidfuzz.distance import Levenshtein


def confusion_matrix(y: torch.Tensor, pred: torch.Tensor, k: int) -> torch.Tensor:
    """C[i, j] = number of items of class i predicted as class j."""
    return torch.bincount(y * k + pred, minlength=k * k).reshape(k, k)


def precision_recall_f1(cm: torch.Tensor):
    """Per class k: precision = C_kk / sum_i C_ik, recall = C_kk / sum_j C_kj,
    F1 = 2 P R / (P + R); 0 where a denominator is 0 (scikit-learn's zero_division=0)."""
    cm = cm.double()
    tp = cm.diag()
    predicted, actual = cm.sum(0), cm.sum(1)
    p = torch.where(predicted > 0, tp / predicted.clamp_min(1), 0.0)
    r = torch.where(actual > 0, tp / actual.clamp_min(1), 0.0)
    f1 = torch.where(p + r > 0, 2 * p * r / (p + r).clamp_min(1e-300), 0.0)
    return p, r, f1


def per_class_figures(cm: torch.Tensor, labels) -> dict:
    """{"per_class": {label: precision, recall, f1, support}, "macro_f1"} from a confusion
    matrix whose first len(labels) rows are the labels' (extra rows, e.g. "other", are not
    reported)."""
    p, r, f1 = precision_recall_f1(cm)
    k = len(labels)
    return {"per_class": {name: {"precision": p[i].item(), "recall": r[i].item(),
                                 "f1": f1[i].item(), "support": int(cm[i].sum())}
                          for i, name in enumerate(labels)},
            "macro_f1": f1[:k].mean().item()}


def edit_distance(ref, hyp) -> int:
    """Levenshtein distance: the fewest substitutions, deletions and insertions turning ref
    into hyp (strings, or lists of words); D[i][j] = min(D[i-1][j] + 1, D[i][j-1] + 1,
    D[i-1][j-1] + [ref_i != hyp_j]). Computed by rapidfuzz's compiled bit-parallel kernel (the
    one jiwer uses; a 600-word transcript in ~2 ms where the table below takes ~3 s);
    edit_distance_reference is the table written out, which the tests check it against."""
    return Levenshtein.distance(ref, hyp)


def edit_distance_reference(ref, hyp) -> int:
    """edit_distance by filling the table D row by row, O(len(ref) len(hyp)) in Python."""
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i]
        for j, h in enumerate(hyp, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h)))
        prev = cur
    return prev[-1]


def error_rates(refs: list[str], hyps: list[str]) -> dict[str, float]:
    """WER = sum of word edit distances / reference words; CER the same over characters
    (spaces included), both pooled over the corpus as jiwer computes them."""
    words = sum(edit_distance(r.split(), h.split()) for r, h in zip(refs, hyps))
    chars = sum(edit_distance(r, h) for r, h in zip(refs, hyps))
    n_words = sum(len(r.split()) for r in refs)
    n_chars = sum(len(r) for r in refs)
    return {"wer": words / max(n_words, 1), "cer": chars / max(n_chars, 1)}


def mase(pred: torch.Tensor, y: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Mean over windows of mean_h |y_h - pred_h| / scale, scale = the in-sample mean absolute
    error of the seasonal naive forecast, mean_t |x_t - x_(t-m)| (Hyndman & Koehler 2006)."""
    return ((pred - y).abs().mean(-1) / scale).mean()


def smape(pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean of 200 |y - pred| / (|y| + |pred|) over steps and windows, in % (M4's sMAPE)."""
    return (200 * (y - pred).abs() / (y.abs() + pred.abs()).clamp_min(1e-8)).mean()
