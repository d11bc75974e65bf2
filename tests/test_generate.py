"""Decoding: the KV cache changes nothing, seeds repeat, and each sampling rule is the
reference one (Hugging Face's logits processors)."""

import numpy as np
import pytest
import torch

from monotile.core.transformer import ModelConfig, init_weights
from monotile.infer.convert import convert
from monotile.infer.generate import (Sampling, TextPieces, apply_presence_frequency,
                                     apply_repetition_penalty, generate_ids,
                                     top_k_filter, top_p_filter)
from monotile.modalities.text import LanguageModel


def random_lm(style: str = "gpt2", context: int = 48) -> LanguageModel:
    extra = dict(norm="rmsnorm", mlp="swiglu", positions="rope", n_kv_head=2, bias=False) \
        if style == "llama" else {}
    cfg = ModelConfig(vocab_size=50, n_layer=2, n_head=4, d_model=32, context=context, **extra)
    torch.manual_seed(0)
    model = LanguageModel(cfg)
    init_weights(model, 2, std=0.3)  # large weights: peaked, varied predictions
    return model.eval()


@pytest.mark.parametrize("style", ["gpt2", "llama"])
def test_kv_cache_generation_equals_full_recompute(style):
    model = random_lm(style)
    prompt = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    greedy = Sampling(temperature=0)
    cached = torch.stack(list(generate_ids(model, prompt, 40, greedy, use_cache=True)), 1)
    full = torch.stack(list(generate_ids(model, prompt, 40, greedy, use_cache=False)), 1)
    assert cached.tolist() == full.tolist()
    assert len(set(cached[0].tolist())) > 3  # not a degenerate repeat of one token


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_int8_and_int4_decode_from_a_bf16_cache_as_they_would_recompute(dtype):
    # their KV cache in bf16 (half fp32's bytes, as llama.cpp keeps f16): each step's logits
    # those of the whole sequence recomputed in fp32, to bf16's rounding of K and V
    model = random_lm("llama")
    convert(model, dtype)
    cache = model.trunk.make_cache(1, 16)
    assert all(c.k.dtype == c.v.dtype == torch.bfloat16 for c in cache)
    assert model.trunk.make_cache(1, 16, dtype=torch.float32)[0].k.dtype == torch.float32
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6, 5, 3]])
    with torch.no_grad():
        full = model(ids)
        steps = [model(ids[:, :4], cache=cache, pos=0)[:, -1]]
        steps += [model(ids[:, t:t + 1], cache=cache, pos=t)[:, -1] for t in range(4, 10)]
    spread = full.std().item()  # the logits' scale (large weights: ~2)
    # (int4's worst logit is 0.070 off with the cache read as bf16, 0.086 with it cast to fp32
    # for the kernel, as convert does where that is faster: the rounding of K and V in both)
    torch.testing.assert_close(torch.stack(steps, 1), full[:, 3:], atol=0.06 * spread, rtol=0)


def test_kv_cache_sampling_equals_full_recompute_with_the_same_seed():
    model = random_lm()
    prompt = torch.tensor([[7, 7, 8]])
    s = Sampling(temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.2)
    a = torch.stack(list(generate_ids(model, prompt, 30, s, seed=3, use_cache=True)), 1)
    b = torch.stack(list(generate_ids(model, prompt, 30, s, seed=3, use_cache=False)), 1)
    assert a.tolist() == b.tolist()


def test_same_seed_same_tokens_other_seed_other_tokens():
    model = random_lm()
    prompt = torch.tensor([[1, 2, 3]])
    s = Sampling(temperature=1.0)

    def run(seed):
        return torch.stack(list(generate_ids(model, prompt, 30, s, seed=seed)), 1).tolist()
    assert run(11) == run(11)
    assert run(11) != run(12)


def test_generation_goes_on_past_the_context_by_shifting_the_cache():
    model = random_lm(context=16)
    tokens = list(generate_ids(model, torch.tensor([[1, 2, 3]]), 50, Sampling(temperature=0)))
    assert len(tokens) == 50


def test_top_k_equals_hugging_face_top_k_warper():
    from transformers.generation.logits_process import TopKLogitsWarper
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    ref = TopKLogitsWarper(top_k=7)(None, logits.clone())
    assert torch.equal(top_k_filter(logits, 7), ref)


def test_top_p_equals_hugging_face_top_p_warper():
    from transformers.generation.logits_process import TopPLogitsWarper
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1)) * 3
    for p in (0.1, 0.5, 0.9):
        ref = TopPLogitsWarper(top_p=p)(None, logits.clone())
        assert torch.equal(torch.isinf(top_p_filter(logits, p)), torch.isinf(ref)), p


def test_repetition_penalty_equals_hugging_face_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    g = torch.Generator().manual_seed(2)
    logits, seen = torch.randn(2, 50, generator=g), torch.randint(50, (2, 9), generator=g)
    ref = RepetitionPenaltyLogitsProcessor(penalty=1.3)(seen, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), ref)


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=1.5),
                                 dict(repetition_penalty=0)])
def test_invalid_sampling_settings_are_refused(bad):
    from monotile.errors import ConfigError
    with pytest.raises(ConfigError, match="is invalid"):
        Sampling(**bad)


def test_sampling_equals_hugging_face_processors_applied_in_order():
    from transformers.generation.logits_process import (
        LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
        TopKLogitsWarper, TopPLogitsWarper)
    from monotile.infer.generate import next_token
    g = torch.Generator().manual_seed(0)
    logits, seen = torch.randn(64, 50, generator=g) * 2, torch.randint(50, (64, 6), generator=g)
    hf = LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.3), TemperatureLogitsWarper(0.7),
                              TopKLogitsWarper(10), TopPLogitsWarper(0.8)])
    probs = hf(seen, logits.clone()).softmax(-1).double()
    # the same uniform numbers through HF's probabilities' cumulative sums, by numpy
    u = torch.rand(64, dtype=torch.float64, generator=torch.Generator().manual_seed(5)).numpy()
    cdf = np.cumsum(probs.numpy(), axis=1)
    expected = [int(np.searchsorted(c, x * c[-1], side="right")) for c, x in zip(cdf, u)]
    s = Sampling(temperature=0.7, top_k=10, top_p=0.8, repetition_penalty=1.3)
    ours = next_token(logits, seen, s, torch.Generator().manual_seed(5))
    assert ours.tolist() == expected
    assert bool((probs.gather(1, ours[:, None]) > 0).all())  # never a token HF filtered out


def test_a_draw_follows_its_weights():
    """draw: index j with probability w_j / sum(w), a weight of 0 never: 200,000 draws
    against the expected counts (each within 5 standard deviations) and a chi-square test."""
    from scipy.stats import chisquare
    from monotile.infer.generate import draw
    w = torch.tensor([[3.0, 0.0, 1.0, 0.5, 0.0, 2.5, 1e-3]])
    n = 200_000
    idx = draw(w.expand(n, -1), torch.Generator().manual_seed(1))
    counts = torch.bincount(idx, minlength=w.size(1)).double()
    p = (w[0] / w.sum()).double()
    assert counts[1] == counts[4] == 0
    assert bool(((counts - n * p).abs() <= 5 * (n * p * (1 - p)).sqrt() + 1e-9).all())
    keep = p > 0
    assert chisquare(counts[keep].numpy(), n * p[keep].numpy()).pvalue > 1e-3
    assert draw(torch.tensor([[0.0, 0.0, 1.0]]), None).item() == 2


def test_presence_and_frequency_penalties_follow_openais_formula():
    logits = torch.tensor([[1.0, -2.0, 0.5, 3.0]])
    counts = torch.tensor([[0, 2, 1, 5]])
    out = apply_presence_frequency(logits, counts, presence=0.5, frequency=0.25)
    # l_j - c_j * frequency - [c_j > 0] * presence, by hand
    expected = torch.tensor([[1.0, -2.0 - 0.5 - 0.5, 0.5 - 0.25 - 0.5, 3.0 - 1.25 - 0.5]])
    torch.testing.assert_close(out, expected)
    assert apply_presence_frequency(logits, counts, 0.0, 0.0) is logits


def test_text_pieces_hold_back_what_may_start_a_stop_string():
    chars = list("hello world. bye")
    pieces = TextPieces(lambda ids: "".join(chars[i] for i in ids), stop=["d. b"])
    out = ""
    for i in range(len(chars)):
        out += pieces.push(i)
        if pieces.stopped:
            break
    assert out == "hello worl" and pieces.stopped and pieces.flush() == ""
    plain = TextPieces(lambda ids: "".join(chars[i] for i in ids))
    assert "".join(plain.push(i) for i in range(5)) + plain.flush() == "hello"



# ---- ending at the model's end tokens ------------------------------------------------------------

def chat_tokenizer(special_id: int, vocab: int = 50):
    """A character vocabulary of `vocab` ids in which `special_id` is the special token
    <|im_end|> (decoding leaves it out, as a checkpoint's tokenizer does)."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models
    from monotile.tokenizers import Tokenizer
    chars = iter("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,")
    tokens = {("<|im_end|>" if i == special_id else next(chars)): i for i in range(vocab)}
    tok = HFTokenizer(models.BPE(vocab=tokens, merges=[]))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken("<|im_end|>", special=True)])
    return Tokenizer(tok, "hf")


def greedy_ids(model, prompt_ids, n=12) -> list[int]:
    out = generate_ids(model, torch.tensor([prompt_ids]), n, Sampling(temperature=0))
    return [int(t[0]) for t in out]


def forced_end(model, prompt_ids) -> tuple[list[int], int]:
    """The greedy continuation of a random model and a step k whose token has not come before:
    made an end id, generation must stop there with the text of the first k tokens."""
    ids = greedy_ids(model, prompt_ids)
    k = next(k for k in range(2, len(ids)) if ids[k] not in ids[:k])
    return ids, k


def text_task(tokenizer, **config):
    from monotile.modalities.text import TextConfig, TextTask
    return TextTask(TextConfig(tokenizer="hf", **config), tokenizer, context=48)


@pytest.mark.parametrize("as_list", [False, True])
def test_generation_stops_at_an_end_id_which_is_not_shown(as_list):
    model = random_lm()
    prompt = "abc"
    tok = chat_tokenizer(special_id=49)
    ids, k = forced_end(model, tok.encode(prompt))
    unused = next(i for i in range(50) if i not in ids)
    eos_ids = (unused, ids[k]) if as_list else (ids[k],)  # a checkpoint may list several
    task = text_task(tok, eos_ids=eos_ids)
    pieces = list(task.stream(model, prompt, max_new_tokens=12, sampling=Sampling(temperature=0)))
    assert "".join(pieces) == tok.decode(ids[:k])
    assert "".join(text_task(tok).stream(model, prompt, max_new_tokens=12,
                                         sampling=Sampling(temperature=0))) == tok.decode(ids)


def test_a_stop_string_that_is_a_special_token_stops_generation():
    model = random_lm()
    probe = chat_tokenizer(special_id=49)
    ids, k = forced_end(model, probe.encode("abc"))
    tok = chat_tokenizer(special_id=ids[k])  # the model's k-th token is <|im_end|>
    task = text_task(tok)
    assert task.special_texts == {ids[k]: "<|im_end|>"}
    greedy = Sampling(temperature=0)
    shown = "".join(task.stream(model, "abc", max_new_tokens=12, sampling=greedy))
    assert "<|im_end|>" not in shown and shown == tok.decode(ids)  # the user never sees it
    stopped = "".join(task.stream(model, "abc", max_new_tokens=12, sampling=greedy,
                                  stop=["<|im_end|>"]))
    assert stopped == tok.decode(ids[:k])


def test_text_pieces_match_stop_strings_across_special_tokens_and_end_at_end_ids():
    chars = {i: c for i, c in enumerate("ab c\n")}
    specials = {7: "<|im_end|>", 8: "</s>"}

    def run(ids, **options):
        pieces = TextPieces(lambda seq: "".join(chars.get(i, "") for i in seq),
                            specials=specials, **options)
        out = ""
        for i in ids:
            out += pieces.push(i)
            if pieces.stopped:
                break
        return out + pieces.flush(), pieces.stopped

    assert run([0, 1, 7, 4, 3]) == ("ab\nc", False)  # special tokens are not shown
    assert run([0, 1, 7, 4, 3], stop=["<|im_end|>"]) == ("ab", True)
    assert run([0, 1, 7, 4, 3], stop=["b<|im_end|>\n"]) == ("a", True)
    assert run([0, 1, 7, 4, 3], stop=["<|im_end|>\nc"]) == ("ab", True)
    assert run([0, 1, 2, 3, 8, 4], stop=["zzzzzz"], end_ids=[8]) == ("ab c", True)
    assert run([8, 0], end_ids=(8,)) == ("", True)


def test_the_serving_engine_stops_at_end_ids_and_special_stop_strings():
    import queue
    from monotile.serve.engine import Engine, Job
    model = random_lm()
    probe = chat_tokenizer(special_id=49)
    ids, k = forced_end(model, probe.encode("abc"))
    tok = chat_tokenizer(special_id=ids[k])
    task = text_task(tok)
    engine = Engine(model, tok.decode, max_batch=4)
    try:
        def answer(**options):
            events = queue.Queue()
            engine.submit([Job(tok.encode("abc"), 12, Sampling(temperature=0), events.put,
                               **options)])
            text = ""
            while (event := events.get(timeout=60))["type"] == "token":
                text += event["text"]
            assert event["type"] == "done", event
            return text, event["finish_reason"], event["completion_tokens"]
        assert answer() == (tok.decode(ids), "length", 12)
        assert answer(end_ids=(ids[k],)) == (tok.decode(ids[:k]), "stop", k + 1)
        assert answer(stop=["<|im_end|>"], specials=task.special_texts) == \
            (tok.decode(ids[:k]), "stop", k + 1)
    finally:
        engine.close()


def test_the_serving_engines_thread_lives_while_there_is_work(monkeypatch):
    """An idle engine's thread ends (its OpenMP workers with it: engine.py), the next submit
    starts another, and a request gets the same tokens from either thread."""
    import queue
    import threading
    from monotile.serve import engine as engine_module
    from monotile.serve.engine import Job
    monkeypatch.setattr(engine_module, "LINGER", 0.05)
    model, tok = random_lm(), chat_tokenizer(special_id=49)
    engine = engine_module.Engine(model, tok.decode, max_batch=2)
    try:
        assert engine.thread is None  # nothing to do yet

        def answer():
            events = queue.Queue()  # each event with the thread that emitted it
            engine.submit([Job(tok.encode("abc"), 8, Sampling(temperature=0.9),
                               lambda e: events.put((e, threading.current_thread())), seed=3)])
            tokens = []
            while (got := events.get(timeout=60))[0]["type"] == "token":
                tokens.append(got[0]["token"])
            assert got[0]["type"] == "done", got
            return tokens, got[1]
        first, thread = answer()
        thread.join(timeout=10)  # idle for LINGER: it ends
        assert not thread.is_alive() and engine.thread is None
        again, other = answer()
        assert again == first and other is not thread
    finally:
        engine.close()
    assert engine.thread is None or not engine.thread.is_alive()
