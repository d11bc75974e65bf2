"""CTC: the hand-written loss equals PyTorch's, and decoding and alignment equal brute force
over every alignment of a tiny utterance."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from monotile.infer.ctc import (NEG, Lexicon, _extended, _logsumexp_predecessors,
                                _logsumexp_successors, _predecessors, beam_search, ctc_loss,
                                forced_align, greedy_decode)


def collapse(path, blank=0):
    """B(pi): merge repeats, drop blanks."""
    return tuple(c for i, c in enumerate(path) if c != blank and (i == 0 or c != path[i - 1]))


def all_alignments(log_probs):
    """(path, log-prob) for each of the C^T alignments of log_probs (T, C)."""
    T, C = log_probs.shape
    for path in itertools.product(range(C), repeat=T):
        yield path, sum(log_probs[t, c].item() for t, c in enumerate(path))


def brute_force_labellings(log_probs) -> dict[tuple, float]:
    """log P(y) = logsumexp over the alignments that spell y, for every y."""
    mass: dict[tuple, list[float]] = {}
    for path, lp in all_alignments(log_probs):
        mass.setdefault(collapse(path), []).append(lp)
    return {y: torch.tensor(v).logsumexp(0).item() for y, v in mass.items()}


def peaked(tokens, C, peak=0.9):
    """log_probs (T, C) with probability `peak` on tokens[t] at frame t, the rest spread evenly."""
    probs = torch.full((len(tokens), C), (1 - peak) / (C - 1))
    probs[torch.arange(len(tokens)), torch.tensor(tokens)] = peak
    return probs.log()


def torch_ctc(lp, targets, il, tl, **kw):
    return F.ctc_loss(lp.transpose(0, 1), targets, il, tl, **kw)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_ctc_loss_and_gradient_equal_pytorch(reduction):
    torch.manual_seed(0)
    B, T, C, S = 6, 15, 6, 5
    logits = torch.randn(B, T, C, requires_grad=True)
    targets = torch.randint(1, C, (B, S))
    targets[0, 1:3] = 4  # a repeated label, as "ee"
    targets[1] = 2  # all repeats
    il = torch.tensor([15, 15, 11, 9, 4, 1])
    tl = torch.tensor([5, 5, 3, 0, 2, 0])  # target length 0: only blanks
    lp = logits.log_softmax(-1)
    ours = ctc_loss(lp, targets, il, tl, reduction=reduction)
    ref = torch_ctc(lp, targets, il, tl, reduction=reduction)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    # PyTorch's kernel returns d/d logits (through log_softmax), not d/d log_probs: compare there
    g_ours, = torch.autograd.grad(ours.sum(), logits, retain_graph=True)
    g_ref, = torch.autograd.grad(ref.sum(), logits)
    torch.testing.assert_close(g_ours, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_infeasible_item_is_inf_or_zero_with_finite_gradients(zero_infinity):
    torch.manual_seed(1)
    logits = torch.randn(3, 6, 4, requires_grad=True)
    targets = torch.tensor([[1, 2, 3], [1, 1, 2], [3, 3, 3]])
    il = torch.tensor([6, 6, 4])  # "333" needs 5 frames: the last item is impossible
    tl = torch.tensor([3, 3, 3])
    lp = logits.log_softmax(-1)
    ours = ctc_loss(lp, targets, il, tl, reduction="none", zero_infinity=zero_infinity)
    ref = torch_ctc(lp, targets, il, tl, reduction="none", zero_infinity=zero_infinity)
    assert ours[2].item() == (0.0 if zero_infinity else math.inf)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-5)
    picked = ours.sum() if zero_infinity else ours[:2].sum()
    g_ours, = torch.autograd.grad(picked, logits, retain_graph=True)
    assert torch.isfinite(g_ours).all()
    if zero_infinity:
        assert (g_ours[2] == 0).all()
        g_ref, = torch.autograd.grad(ref.sum(), logits)
        torch.testing.assert_close(g_ours, g_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_ctc_gradient_by_beta_recursion_passes_gradcheck(reduction):
    # d loss / d log_probs, log_probs free (not through a log-softmax), against finite
    # differences in float64: repeats, S_b = 0, T_b = 0, short T_b, and an impossible item
    torch.manual_seed(4)
    log_probs = torch.randn(5, 6, 4, dtype=torch.float64).log_softmax(-1).requires_grad_()
    targets = torch.tensor([[1, 1, 2], [3, 2, 1], [2, 0, 0], [1, 2, 3], [3, 3, 3]])
    il = torch.tensor([6, 4, 3, 0, 4])  # "333" needs 5 frames: item 4 is impossible
    tl = torch.tensor([3, 2, 0, 0, 3])
    loss = ctc_loss(log_probs, targets, il, tl, reduction=reduction, zero_infinity=True)
    assert loss.dtype == torch.float64
    assert torch.autograd.gradcheck(
        lambda lp: ctc_loss(lp, targets, il, tl, reduction=reduction, zero_infinity=True),
        (log_probs,))
    g, = torch.autograd.grad(loss.sum(), log_probs)
    assert (g[4] == 0).all() and (g[3] == 0).all()  # impossible item; no frames at all
    assert (g[1, 4:] == 0).all() and (g[2, 3:] == 0).all()  # frames past T_b


def test_step_helpers_equal_predecessors_logsumexp():
    torch.manual_seed(5)
    targets, tl = torch.tensor([[1, 1, 2, 3], [2, 3, 3, 0]]), torch.tensor([4, 3])
    ext, skip = _extended(targets, tl, blank=0)
    score = torch.randn(ext.shape).masked_fill(torch.rand(ext.shape) < 0.3, NEG)
    bias = torch.zeros_like(score).masked_fill(~skip, NEG)
    torch.testing.assert_close(_logsumexp_predecessors(score, bias),
                               _predecessors(score, skip).logsumexp(-1))
    after = F.pad(score, (0, 2), value=NEG)  # score at s + 1, s + 2; the skip at s + 2
    want = torch.stack([score, after[:, 1:-1], after[:, 2:] + F.pad(bias[:, 2:], (0, 2))], -1)
    torch.testing.assert_close(
        _logsumexp_successors(score, F.pad(bias[:, 2:], (0, 2), value=NEG)), want.logsumexp(-1))


def test_ctc_loss_by_hand():
    # T=2, C=2, y = [1]: alignments "1b", "b1", "11"
    p = torch.tensor([[0.3, 0.7], [0.6, 0.4]])
    prob = p[0, 1] * p[1, 0] + p[0, 0] * p[1, 1] + p[0, 1] * p[1, 1]
    loss = ctc_loss(p.log()[None], torch.tensor([[1]]), torch.tensor([2]), torch.tensor([1]),
                    reduction="none")
    assert loss.item() == pytest.approx(-math.log(prob.item()), abs=1e-6)


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    lp = peaked([1, 1, 0, 1, 2, 2, 0, 0, 3], C=4)
    assert greedy_decode(lp) == [[1, 1, 2, 3]]
    assert greedy_decode(torch.stack([lp, lp]), torch.tensor([9, 5])) == [[1, 1, 2, 3], [1, 1, 2]]


def test_beam_search_equals_brute_force_and_ctc_loss():
    torch.manual_seed(2)
    lp = (2 * torch.randn(5, 3)).log_softmax(-1)  # T=5, C=3
    exact = brute_force_labellings(lp)
    hyps = beam_search(lp, beam_width=100)  # wider than the 63 possible prefixes: exact
    best = max(exact, key=exact.get)
    assert tuple(hyps[0][0]) == best
    assert hyps[0][1] == pytest.approx(exact[best], abs=1e-5)
    assert len(hyps) == len(exact)  # every labelling of nonzero probability, and only those
    for labels, score in hyps:
        assert score == pytest.approx(exact[tuple(labels)], abs=1e-5)
    for labels, score in hyps[:5]:
        y = torch.tensor([labels + [1] * (5 - len(labels))])  # padded
        loss = ctc_loss(lp[None], y, torch.tensor([5]), torch.tensor([len(labels)]),
                        reduction="none")
        assert score == pytest.approx(-loss.item(), abs=1e-5)


def test_beam_search_finds_the_labelling_greedy_misses():
    # p(blank) = 0.6 each frame: the best path "bb" spells "" (0.36), but "a" has
    # 0.4 * 0.6 + 0.6 * 0.4 + 0.4 * 0.4 = 0.64 over three paths
    lp = torch.tensor([[0.6, 0.4], [0.6, 0.4]]).log()
    assert greedy_decode(lp) == [[]]
    labels, score = beam_search(lp, beam_width=2)[0]
    assert labels == [1] and score == pytest.approx(math.log(0.64), abs=1e-6)
    assert beam_search(lp, beam_width=2, length=1)[0][0] == []  # one frame: "" 0.6 > "a" 0.4


# tokens: 0 blank, 1 space, 2 c, 3 a, 4 t, 5 p, 6 d, 7 o, 8 g
CAT, DOG = [2, 3, 4], [6, 7, 8]


def cap_dog_frames():
    """'cap dog' on the best path, but 't' only a little less likely than 'p'."""
    lp = peaked([2, 3, 5, 1, 6, 0, 7, 8], C=9, peak=0.8).exp()
    lp[2, 4], lp[2, 5] = 0.3, 0.5  # frame 2: p 0.5, t 0.3
    return (lp / lp.sum(-1, keepdim=True)).log()


def test_lexicon_trie():
    lex = Lexicon([CAT, [2, 3, 5, 4]], separator=1)
    s = lex.start
    for token in CAT:
        assert not lex.is_complete(s)
        s = lex.next_states(s)[token]
    assert lex.is_complete(s) and set(lex.next_states(s)) == {1}
    assert 5 not in lex.next_states(lex.next_states(s)[1])  # a new word starts at the root
    one_word = Lexicon([CAT], separator=None)
    s = one_word.start
    for token in CAT:
        s = one_word.next_states(s)[token]
    assert one_word.is_complete(s) and one_word.next_states(s) == {}
    with pytest.raises(ValueError, match="separator"):
        Lexicon([[2, 1, 3]], separator=1)


def test_lexicon_constrains_beam_search_to_words():
    lp = cap_dog_frames()
    assert greedy_decode(lp) == [[2, 3, 5, 1, 6, 7, 8]]  # "cap dog": not words
    assert beam_search(lp)[0][0] == [2, 3, 5, 1, 6, 7, 8]
    words = Lexicon([CAT, DOG, [2, 3, 6]], separator=1)
    labels, score = beam_search(lp, lexicon=words)[0]
    assert labels == [*CAT, 1, *DOG]
    target = torch.tensor([labels])
    assert score == pytest.approx(-ctc_loss(lp[None], target, torch.tensor([8]), torch.tensor(
        [7]), reduction="none").item(), abs=1e-4)
    for labels, _ in beam_search(lp, lexicon=Lexicon([CAT, DOG], separator=None)):
        assert labels in (CAT, DOG)  # one word, nothing after it
    assert beam_search(lp[:2], lexicon=words) == []  # two frames cannot spell a whole word


def test_forced_align_obvious_case():
    lp = peaked([1, 1, 0, 2, 0, 2, 2, 0], C=3)
    assert forced_align(lp, [1, 2, 2]) == [(0, 1), (3, 3), (5, 6)]
    assert forced_align(lp, []) == []
    with pytest.raises(ValueError, match="at least 3"):
        forced_align(lp[:2], [2, 2])


def test_forced_align_is_the_best_alignment():
    torch.manual_seed(3)
    lp = (2 * torch.randn(6, 3)).log_softmax(-1)
    target = [1, 1, 2]
    spans = forced_align(lp, target)
    path = [0] * 6
    for token, (first, last) in zip(target, spans):
        path[first:last + 1] = [token] * (last - first + 1)
    assert collapse(path) == tuple(target)
    best = max(score for p, score in all_alignments(lp) if collapse(p) == tuple(target))
    assert sum(lp[t, c].item() for t, c in enumerate(path)) == pytest.approx(best, abs=1e-5)
