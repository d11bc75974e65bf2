"""A GGUF file's tokenizer, both ways: llama.cpp's metadata (`tokenizer.ggml.*`) <-> a Hugging
Face tokenizer.json.

    tokens[i], token_type[i]   the vocabulary by id; types 1 normal, 3 control (special, never
                               split), 4 user-defined (matched whole), 5 unused, 6 byte
    merges                     "a b", best first: byte-level BPE (`model` "gpt2")
    pre                        which regexes cut the text into pieces before the merges
    bos/eos/eot_token_id, add_bos_token, chat_template

Byte-level BPE (`model` "gpt2": GPT-2, Llama 3, Qwen2, SmolLM): text -> pieces by the
pre-tokenizer's regexes, each applied to the pieces of the one before, matches and the text
between them kept apart ("isolated") -> each piece's UTF-8 bytes spelled in GPT-2's 256-symbol
alphabet -> merges by rank -> ids. llama.cpp names its regex lists (llama-vocab.cpp); `PRE`
writes each as the model's own tokenizer.json does (a Split per regex, or Digits and
ByteLevel's built-in GPT-2 regex), so the same table also names a run's pre-tokenizer on
export. Control tokens are added as special tokens (matched in the text before it is split);
the BOS is prepended by a post-processor when add_bos_token says so, as llama.cpp does.
SentencePiece vocabularies (`model` "llama": Llama 2, Mistral v0.1) are refused by name.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer

from ..errors import CheckpointError, ConfigError

NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5

GPT2_RE = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_RE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_RE = LLAMA3_RE.replace(r"\p{N}{1,3}", r"\p{N}")
DEFAULT_RES = (r"[\p{P}\$\+<=>\^~\|]+", GPT2_RE, r"\p{N}+", "[0-9][0-9][0-9]")


def _split(*regexes: str) -> pre_tokenizers.PreTokenizer:
    """Each regex cuts the pieces of the one before (llama.cpp's regex_exprs), then bytes."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), "isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


@dataclass(frozen=True)
class Pre:
    names: tuple[str, ...]        # llama.cpp's names for it; export writes the first
    build: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False   # a piece that is a token is taken whole (llama.cpp's LLAMA3)


PRE = (
    Pre(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4"),
        lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)),
    Pre(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
        lambda: pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])),
    Pre(("llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
         "lfm2"), lambda: _split(LLAMA3_RE), ignore_merges=True),
    Pre(("dbrx", "smaug-bpe"), lambda: _split(LLAMA3_RE)),
    Pre(("qwen2", "deepseek-r1-qwen", "stablelm2", "hunyuan", "megrez"),
        lambda: _split(QWEN2_RE)),
    Pre(("default",), lambda: _split(*DEFAULT_RES)),  # also a file that names none
)
BY_NAME = {name: pre for pre in PRE for name in pre.names}

# the special tokens a text run names: tokenizer.ggml.{key}_token_id <-> TextConfig.{key}_token
SPECIAL = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
# the end of a turn, by the texts llama.cpp looks for (llama-vocab.cpp's end-of-generation set)
END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>",
               "<|endoftext|>", "<|end_of_text|>", "<EOT>")


# ---- import: metadata -> tokenizer.json --------------------------------------------------------

def tokenizer_in(meta: dict, path: Path) -> dict:
    """Save the file's tokenizer as `path` (tokenizer.json); returns the text run's settings
    it implies: chat_template, eos_ids and the special tokens' texts (bos_token, ...)."""
    kind = meta.get("tokenizer.ggml.model")
    if kind == "llama":
        raise ConfigError("the file's tokenizer is a SentencePiece vocabulary "
                          "(tokenizer.ggml.model 'llama': Llama 2, Mistral v0.1), which import "
                          "does not read yet; import the model's Hugging Face folder instead")
    if kind != "gpt2":
        raise ConfigError(f"tokenizer.ggml.model={kind!r} is not supported (supported: gpt2, "
                          "byte-level BPE); import the model's Hugging Face folder instead")
    name = meta.get("tokenizer.ggml.pre", "default")
    if name not in BY_NAME:
        raise ConfigError(f"tokenizer.ggml.pre={name!r} is not a pre-tokenizer monotile knows "
                          f"(it knows {', '.join(sorted(BY_NAME))}); import the model's Hugging "
                          "Face folder instead")
    pre = BY_NAME[name]
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = list(meta.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
    # "a b", cut at the first space after the first character, as llama.cpp does
    merges = [(m[:m.find(" ", 1)], m[m.find(" ", 1) + 1:])
              for m in meta.get("tokenizer.ggml.merges", [])]
    try:
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                     ignore_merges=pre.ignore_merges))
    except Exception as e:  # tokenizers raises a bare Exception for a merge of unknown tokens
        raise CheckpointError(f"the file's vocabulary and merges do not fit together ({e}); "
                              "the file is damaged, download it again") from None
    tok.pre_tokenizer = pre.build()
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED])

    def token(key: str) -> int | None:
        i = meta.get(f"tokenizer.ggml.{SPECIAL.get(key, key)}_token_id")
        return int(i) if i is not None and 0 <= int(i) < len(tokens) else None

    bos, eos = token("bos"), token("eos")
    ends = [bos] if meta.get("tokenizer.ggml.add_bos_token") and bos is not None else []
    tail = [eos] if meta.get("tokenizer.ggml.add_eos_token") and eos is not None else []
    if ends or tail:
        single = [tokens[i] for i in ends] + ["$A"] + [tokens[i] for i in tail]
        tok.post_processor = processors.TemplateProcessing(
            single=single, pair=single + [f"{s}:1" if s != "$A" else "$B:1" for s in single],
            special_tokens=[(tokens[i], i) for i in sorted(set(ends + tail))])
    tok.save(str(path))
    eot = [token(k) for k in ("eot", "eom")] + [
        i for i, (t, k) in enumerate(zip(tokens, types)) if k == CONTROL and t in END_OF_TURN]
    eos_ids = ([eos] if eos is not None else []) + sorted({i for i in eot if i is not None}
                                                           - {eos})
    named = {f"{key}_token": None if token(key) is None else tokens[token(key)]
             for key in SPECIAL}
    return {"chat_template": meta.get("tokenizer.chat_template"), "eos_ids": tuple(eos_ids),
            **named}


# ---- export: tokenizer.json -> metadata ---------------------------------------------------------

def pre_name(tok: HFTokenizer) -> str | None:
    """llama.cpp's name for a tokenizer's pre-tokenizer, None when it is none of PRE."""
    state = json.loads(tok.pre_tokenizer.__getstate__()) if tok.pre_tokenizer else None
    return next((pre.names[0] for pre in PRE
                 if json.loads(pre.build().__getstate__()) == state), None)


def tokenizer_out(path: Path, text_cfg, vocab_size: int) -> dict:
    """The `tokenizer.*` metadata for a run's tokenizer.json, a byte-level BPE (with the name
    llama.cpp gives its pre-tokenizer); ids past the tokenizer's are [PAD{i}], unused, as
    llama.cpp's converter writes them."""
    tok = HFTokenizer.from_file(str(path))
    spec = json.loads(tok.to_str())
    model, decoder = spec.get("model") or {}, json.dumps(spec.get("decoder"))
    vocab = {i: t for t, i in tok.get_vocab(with_added_tokens=True).items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    if model.get("type") == "BPE" and not merges and "ByteLevel" not in decoder:
        return _characters_out(vocab, text_cfg, vocab_size)
    if model.get("type") != "BPE" or "ByteLevel" not in decoder:
        raise ConfigError(f"the run's tokenizer is a {model.get('type')} model, not a byte-level "
                          "BPE, the one kind of vocabulary export gguf writes")
    pre = pre_name(tok)
    if pre is None:
        raise ConfigError(f"the run's pre-tokenizer ({json.dumps(spec['pre_tokenizer'])[:100]}) "
                          "is none that llama.cpp names, so a GGUF file cannot say how to "
                          "split text for it")
    if max(vocab) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(vocab)} but the model only "
                          f"{vocab_size} rows; they do not belong together")
    tokens = [vocab.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    types = [UNUSED if i not in vocab else NORMAL if i not in added else
             CONTROL if added[i].get("special") else USER_DEFINED for i in range(vocab_size)]
    ids = tok.get_vocab(with_added_tokens=True)
    out = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
           "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
           "tokenizer.ggml.merges": merges}
    for key, theirs in SPECIAL.items():
        text = getattr(text_cfg, f"{key}_token")
        if text in ids:
            out[f"tokenizer.ggml.{theirs}_token_id"] = ids[text]
    if "tokenizer.ggml.eos_token_id" not in out and text_cfg.eos_ids:
        out["tokenizer.ggml.eos_token_id"] = text_cfg.eos_ids[0]
    bos = out.get("tokenizer.ggml.bos_token_id")
    out["tokenizer.ggml.add_bos_token"] = bos is not None and tok.encode("").ids[:1] == [bos]
    if text_cfg.chat_template:
        out["tokenizer.chat_template"] = text_cfg.chat_template
    return out


def _characters_out(vocab: dict[int, str], text_cfg, vocab_size: int) -> dict:
    """A character vocabulary (monotile's `tokenizer=char`) as a byte-level BPE without merges:
    each character spelled in GPT-2's byte alphabet, so llama.cpp (and `import gguf`) encode
    every text of those characters to the same ids. Only single-byte (ASCII) characters are
    one symbol there; a vocabulary with others is refused."""
    wide = sorted(c for c in vocab.values() if len(c.encode("utf-8")) != 1)
    if wide:
        raise ConfigError(f"the run's character vocabulary has characters of several UTF-8 bytes "
                          f"({''.join(wide[:10])!r}), which a GGUF byte-level vocabulary spells "
                          "as several tokens; train the run with tokenizer=bpe to export it")
    if max(vocab) >= vocab_size:
        raise ConfigError(f"the tokenizer has ids up to {max(vocab)} but the model only "
                          f"{vocab_size} rows; they do not belong together")
    spell = _bytes_to_unicode()
    tokens = [spell[ord(vocab[i])] if i in vocab else f"[PAD{i}]" for i in range(vocab_size)]
    out = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2",
           "tokenizer.ggml.tokens": tokens,
           "tokenizer.ggml.token_type": [NORMAL if i in vocab else UNUSED
                                         for i in range(vocab_size)],
           "tokenizer.ggml.merges": [], "tokenizer.ggml.add_bos_token": False}
    if text_cfg.chat_template:
        out["tokenizer.chat_template"] = text_cfg.chat_template
    return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 byte values to printable characters: printable Latin-1 bytes are
    themselves, the others (space, newline, controls) are shifted past 255 (Ġ for space)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    shifted = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + n) for n, b in enumerate(shifted)}}
