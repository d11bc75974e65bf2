"""Connectionist temporal classification: the loss, decoding and forced alignment.

CTC (Graves et al. 2006) reads labels y from per-frame distributions p_t(c) over the classes
plus a blank. An alignment pi (one class per frame) spells B(pi): merge repeats, drop blanks;
  P(y | x) = sum_{pi in B^-1(y)} prod_t p_t(pi_t)
Forward recursion over l' = (blank, y_1, blank, y_2, ..., y_S, blank), |l'| = 2S + 1:
  alpha_t(s) = logsumexp(alpha_{t-1}(s), alpha_{t-1}(s-1), [alpha_{t-1}(s-2)]) + log p_t(l'_s)
  the skip term only where l'_s != blank and l'_s != l'_{s-2}; alpha_{-1} = (0, -inf, -inf, ...)
  loss = -log P(y | x) = -logsumexp(alpha_{T-1}(2S), alpha_{T-1}(2S-1))
Backward recursion, beta also including the emission at t (so alpha_t(s) beta_t(s) / p_t(l'_s)
is the mass of the alignments that sit in state s at frame t):
  beta_t(s) = logsumexp(beta_{t+1}(s), beta_{t+1}(s+1), [beta_{t+1}(s+2)]) + log p_t(l'_s)
  the skip term where alpha allows s -> s+2; beta_{T-1}(s) = log p_{T-1}(l'_s) at s = 2S, 2S-1
  (-inf elsewhere); item b of a batch uses its own T_b, and frames t >= T_b have beta = -inf
Gradient, log_probs taken as free inputs (not through a log-softmax):
  d loss / d log p_t(c) = -sum_{s: l'_s = c} exp(alpha_t(s) + beta_t(s) - log p_t(l'_s) - log P)
Greedy (best path) decoding: y = B(argmax_c p_t(c), t = 0..T-1).
Prefix beam search (Hannun et al. 2014) keeps for each prefix l the mass of its alignments
ending in blank, P_b(l), and in its last label, P_nb(l); at frame t (sums in log space):
  l stays l:    P_b(l) += (P_b + P_nb)(l) p_t(blank),    P_nb(l) += P_nb(l) p_t(l_last)
  l -> l + c:   P_nb(l + c) += (P_b + P_nb)(l) p_t(c),   or P_b(l) p_t(c) when c = l_last
then keeps the beam_width prefixes of largest P_b + P_nb.
Forced alignment (Viterbi): the alpha recursion with max for logsumexp, backtracked from
argmax(delta_{T-1}(2S), delta_{T-1}(2S-1)), gives the single most probable alignment of y.
"""

from __future__ import annotations

import heapq
import math

import torch
import torch.nn.functional as F

NEG = -1e30  # log 0 as a finite number, so logsumexp and its gradient never meet -inf - -inf


def _extended(targets: torch.Tensor, target_lengths: torch.Tensor, blank: int):
    """l' (B, 2S+1): blanks around each label (padding becomes blank), and skip (B, 2S+1):
    True where alpha(s-2) -> alpha(s) is allowed (l'_s a label different from l'_{s-2})."""
    B, S = targets.shape
    real = torch.arange(S, device=targets.device) < target_lengths[:, None]  # (B, S)
    labels = torch.where(real, targets.long(), blank)
    ext = torch.full((B, 2 * S + 1), blank, dtype=torch.long, device=targets.device)
    ext[:, 1::2] = labels
    skip = torch.zeros_like(ext, dtype=torch.bool)
    skip[:, 3::2] = (labels[:, 1:] != labels[:, :-1]) & real[:, 1:]
    return ext, skip


def _predecessors(score: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
    """(B, L, 3): score (B, L) at s, s-1 and s-2 (the last NEG where the skip is not allowed)."""
    padded = F.pad(score, (2, 0), value=NEG)  # (B, L + 2)
    return torch.stack([score, padded[:, 1:-1], padded[:, :-2].masked_fill(~skip, NEG)],
                       dim=-1)


def _logsumexp_predecessors(score: torch.Tensor, skip_bias: torch.Tensor) -> torch.Tensor:
    """(B, L): logsumexp of score at s, s-1 and s-2 (+ skip_bias[s]: 0 where _extended's skip
    allows s-2 -> s, NEG where not), i.e. _predecessors(score, skip).logsumexp(-1), as two
    logaddexp on shifted views: several times faster on the small tensors of one time step."""
    padded = F.pad(score, (2, 0), value=NEG)  # padded[:, s + 2] = score[:, s]
    return torch.logaddexp(torch.logaddexp(score, padded[:, 1:-1]), padded[:, :-2] + skip_bias)


def _logsumexp_successors(score: torch.Tensor, skip_bias: torch.Tensor) -> torch.Tensor:
    """(B, L): logsumexp of score at s, s+1 and s+2 (+ skip_bias[s]: 0 where s -> s+2 is
    allowed, NEG where not), the twin of _logsumexp_predecessors for the beta recursion."""
    padded = F.pad(score, (0, 2), value=NEG)  # padded[:, s] = score[:, s], NEG past the end
    return torch.logaddexp(torch.logaddexp(score, padded[:, 1:-1]), padded[:, 2:] + skip_bias)


def _final_states(ext: torch.Tensor, target_lengths: torch.Tensor) -> torch.Tensor:
    """(B, L) True at the states where an alignment may end: 2S_b (blank) and 2S_b - 1."""
    s = torch.arange(ext.size(1), device=ext.device)
    end = 2 * target_lengths[:, None]
    return (s == end) | (s == end - 1)  # end - 1 = -1 matches nothing when S_b = 0


class _CTC(torch.autograd.Function):
    """-log P(y_b | x_b) (B,): the alpha recursion forward, the beta recursion backward.

    Both run without an autograd graph (a Function's forward runs under no_grad, on plain
    tensors); forward saves every alpha_t, and backward forms the gradient in log_probs
    analytically (module docstring) instead of differentiating through the time loop.
    """

    @staticmethod
    def forward(ctx, log_probs, ext, skip, input_lengths, target_lengths):
        B, T, _ = log_probs.shape
        dtype = torch.promote_types(log_probs.dtype, torch.float32)
        emit = log_probs.to(dtype).gather(2, ext[:, None, :].expand(B, T, -1)).clamp_min(NEG)
        frame = torch.arange(T, device=ext.device)
        emit = emit.masked_fill((frame >= input_lengths[:, None])[..., None], 0.0)  # (B, T, L)
        skip_bias = torch.zeros_like(emit[:, 0]).masked_fill(~skip, NEG)
        alpha = torch.full_like(emit[:, 0], NEG)
        alpha[:, 0] = 0.0  # alpha_{-1}: the empty prefix, before any frame
        alphas = [alpha]
        for emit_t in emit.unbind(1):
            alpha = _logsumexp_predecessors(alpha, skip_bias) + emit_t
            alphas.append(alpha)
        alphas = torch.stack(alphas, 1)  # (B, T + 1, L): alpha_{-1}, ..., alpha_{T-1}
        # item b ends at alpha_{T_b - 1}, row T_b; the rows after it (frames >= T_b emit
        # log 1 above) are never used: beta is log 0 there
        alpha_end = alphas[torch.arange(B, device=ext.device), input_lengths]  # (B, L)
        final = _final_states(ext, target_lengths)
        log_p = alpha_end.masked_fill(~final, NEG).logsumexp(1)  # (B,)
        ctx.save_for_backward(emit, alphas[:, 1:], log_p, ext, skip_bias, final, input_lengths)
        ctx.input_dtype, ctx.num_classes = log_probs.dtype, log_probs.size(2)
        return -log_p

    @staticmethod
    def backward(ctx, grad_loss):
        emit, alpha, log_p, ext, skip_bias, final, input_lengths = ctx.saved_tensors
        B, T, L = emit.shape
        last = input_lengths[:, None, None] - 1  # T_b - 1
        frame = torch.arange(T, device=emit.device)[:, None]  # broadcasts to (B, T, 1)
        start = torch.where((frame == last) & final[:, None], emit, NEG)  # beta_{T_b - 1}
        inside = frame < last  # frames before T_b - 1 take the recursion
        skip_bias_next = F.pad(skip_bias[:, 2:], (0, 2), value=NEG)  # s -> s+2 allowed: 0
        beta = torch.full_like(emit[:, 0], NEG)  # frames >= T_b keep beta = log 0
        betas = []
        frames = list(zip(emit.unbind(1), start.unbind(1), inside.unbind(1)))
        for emit_t, start_t, inside_t in reversed(frames):  # t = T-1, ..., 0
            step = _logsumexp_successors(beta, skip_bias_next) + emit_t
            beta = torch.where(inside_t, step, start_t)
            betas.append(beta)
        beta = torch.stack(betas[::-1], 1)  # (B, T, L)
        # log gamma_t(s) = log(alpha_t(s) beta_t(s) / (p_t(l'_s) P)): the share of P that is in
        # state s at frame t; an impossible item (P = 0) gets log gamma = -inf, no gradient
        feasible = log_p > NEG / 2
        log_gamma = alpha + beta - emit - log_p.where(feasible, math.inf)[:, None, None]
        # gamma below e * the smallest normal number is flushed to an exact 0: CPU exp is
        # ~100x slower on inputs whose result is subnormal or underflows
        floor = math.log(torch.finfo(log_gamma.dtype).tiny) + 1
        gamma = log_gamma.clamp_min(floor).exp().masked_fill(log_gamma < floor, 0.0)
        grad = torch.zeros(B, T, ctx.num_classes, dtype=emit.dtype, device=emit.device)
        grad.scatter_add_(2, ext[:, None, :].expand(B, T, L), gamma)  # sum over l'_s = c
        grad.mul_(-grad_loss[:, None, None])
        return grad.to(ctx.input_dtype), None, None, None, None


def ctc_loss(log_probs: torch.Tensor, targets: torch.Tensor, input_lengths: torch.Tensor,
             target_lengths: torch.Tensor, *, blank: int = 0, reduction: str = "mean",
             zero_infinity: bool = False) -> torch.Tensor:
    """-log P(y_b | x_b) by the alpha recursion, vectorised over batch and l', looped over time;
    its gradient by the beta recursion (_CTC), computed in float32, or float64 for float64 input.

    log_probs: (B, T, C) log-softmax outputs; targets: (B, S) padded class ids; input_lengths,
    target_lengths: (B,). An item with no alignment (T_b too short) costs +inf, or 0 with a zero
    gradient under zero_infinity. reduction: "none" (B,), "sum", or "mean" = the batch mean of
    loss_b / max(S_b, 1), as torch.nn.functional.ctc_loss.
    """
    if reduction not in ("none", "sum", "mean"):
        raise ValueError(f"reduction={reduction!r} is invalid: use 'none', 'sum' or 'mean'")
    device = log_probs.device
    input_lengths = input_lengths.to(device).long().clamp_max(log_probs.size(1))
    target_lengths = target_lengths.to(device).long()
    ext, skip = _extended(targets.to(device), target_lengths, blank)  # (B, L)
    loss = _CTC.apply(log_probs, ext, skip, input_lengths, target_lengths)
    impossible = loss > -NEG / 2  # every alignment passed through a log 0
    loss = torch.where(impossible, torch.zeros_like(loss) if zero_infinity else math.inf, loss)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return (loss / target_lengths.clamp_min(1)).mean()


def greedy_decode(log_probs: torch.Tensor, lengths: torch.Tensor | None = None, *,
                  blank: int = 0) -> list[list[int]]:
    """Best path decoding B(argmax_c p_t(c)) per item: (B, T, C) -> B lists of class ids.

    A (T, C) input is one utterance and gives a list of one list; lengths: (B,) frames used.
    """
    if log_probs.dim() == 2:
        log_probs = log_probs[None]
    paths = log_probs.argmax(-1).tolist()  # (B, T)
    if lengths is not None:
        lengths = torch.as_tensor(lengths).reshape(-1).tolist()
        paths = [path[:n] for path, n in zip(paths, lengths)]
    return [[c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1])]
            for path in paths]


class Lexicon:
    """A closed vocabulary as a prefix trie over token ids, for constrained decoding.

    A transcript is one word, or (with a separator token) words joined by the separator.
    States are trie nodes, `start` the root; `next_states(state)` maps each token that may
    follow to the state it leads to, and `is_complete(state)` says a transcript may end there.
    """

    start = 0

    def __init__(self, words: list[list[int]], separator: int | None):
        if not words or any(len(w) == 0 for w in words):
            raise ValueError("a Lexicon needs at least one word, and no word may be empty")
        if separator is not None and any(separator in w for w in words):
            raise ValueError(f"the separator {separator} may not occur inside a word")
        self.separator = separator
        self.words = [list(w) for w in words]
        self._next: list[dict[int, int]] = [{}]  # node -> {token: child node}
        self._word_end: list[bool] = [False]
        for word in words:
            node = self.start
            for token in word:
                if token not in self._next[node]:
                    self._next[node][token] = len(self._next)
                    self._next.append({})
                    self._word_end.append(False)
                node = self._next[node][token]
            self._word_end[node] = True
            if separator is not None:
                self._next[node][separator] = self.start  # a word end may start the next word

    def next_states(self, state: int) -> dict[int, int]:
        return self._next[state]

    def is_complete(self, state: int) -> bool:
        return self._word_end[state]


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    m = max(a, b)
    return m + math.log1p(math.exp(-abs(a - b)))


def beam_search(log_probs: torch.Tensor, *, beam_width: int = 8, blank: int = 0,
                lexicon: Lexicon | None = None,
                length: int | None = None) -> list[tuple[list[int], float]]:
    """CTC prefix beam search over one utterance log_probs (T, C), its first `length` frames.

    Returns the surviving hypotheses best first as (class ids, log P(prefix) summed over its
    alignments). Without a lexicon, each frame tries only its beam_width most likely classes
    (all of them when beam_width >= C - 1, which makes a wide enough beam exact). With one,
    prefixes grow only along the trie and only complete transcripts are returned: an empty list
    when none survived. Hypotheses of probability 0 (more repeats than frames) are dropped.
    """
    lp = log_probs[:length].detach().float().cpu()  # (T, C)
    others = lp.clone()
    others[:, blank] = -math.inf
    top = others.topk(min(beam_width, lp.size(1) - 1), dim=-1).indices.tolist()
    beams = {(): (0.0, -math.inf, Lexicon.start)}  # prefix -> (log P_b, log P_nb, lexicon state)
    for t, p in enumerate(lp.tolist()):
        grown: dict[tuple[int, ...], list] = {}

        def add(prefix, b, nb, state, grown=grown):  # this step's hypotheses
            old = grown.setdefault(prefix, [-math.inf, -math.inf, state])
            old[0], old[1] = _logaddexp(old[0], b), _logaddexp(old[1], nb)

        for prefix, (pb, pnb, state) in beams.items():
            total = _logaddexp(pb, pnb)
            last = prefix[-1] if prefix else None
            add(prefix, total + p[blank], pnb + p[last] if prefix else -math.inf, state)
            tokens = lexicon.next_states(state) if lexicon else dict.fromkeys(top[t])
            for c, next_state in tokens.items():
                if c != blank:
                    add(prefix + (c,), -math.inf, (pb if c == last else total) + p[c], next_state)
        best = heapq.nlargest(beam_width, grown.items(), key=lambda kv: _logaddexp(*kv[1][:2]))
        beams = {prefix: tuple(v) for prefix, v in best}
    hyps = [(list(prefix), _logaddexp(pb, pnb)) for prefix, (pb, pnb, state) in beams.items()
            if (lexicon is None or lexicon.is_complete(state)) and max(pb, pnb) > -math.inf]
    return sorted(hyps, key=lambda h: h[1], reverse=True)


def forced_align(log_probs: torch.Tensor, targets: list[int], *,
                 blank: int = 0) -> list[tuple[int, int]]:
    """Viterbi alignment of log_probs (T, C) to `targets`: for each target token, the (first,
    last) frame, inclusive, where the single most probable alignment emits it."""
    T, S = log_probs.size(0), len(targets)
    need = S + sum(a == b for a, b in zip(targets, targets[1:]))  # a blank between repeats
    if T < need:
        raise ValueError(f"cannot align {S} labels to {T} frames: they need at least {need} "
                         "(one per label, plus a blank between each repeated pair)")
    ext, skip = _extended(torch.tensor([targets], dtype=torch.long).reshape(1, S),
                          torch.tensor([S]), blank)
    emit = log_probs.detach().float().cpu()[:, ext[0]].clamp_min(NEG)  # (T, L)
    delta = torch.full(ext.shape, NEG)
    delta[0, 0] = 0.0
    back = []
    for t in range(T):
        preds = _predecessors(delta, skip)  # (1, L, 3)
        back.append(preds[0].argmax(-1))  # how many states back the best predecessor is
        delta = preds.amax(-1) + emit[t]  # (Tensor.max with indices is slow on a busy CPU)
    L = 2 * S + 1
    s = L - 1 if S == 0 or delta[0, L - 1] >= delta[0, L - 2] else L - 2
    path = [0] * T
    for t, moves in zip(reversed(range(T)), reversed(torch.stack(back).tolist())):
        path[t] = s
        s -= moves[s]
    spans: list[list[int]] = [[-1, -1] for _ in targets]
    for t, s in enumerate(path):
        if s % 2:  # an odd state of l' emits target s // 2
            span = spans[s // 2]
            span[0] = t if span[0] < 0 else span[0]
            span[1] = t
    return [(first, last) for first, last in spans]
