"""Text <-> token ids: a character vocabulary or a byte-level BPE, both saved as tokenizer.json.

Character: one id per distinct character of the training text (nanoGPT's shakespeare_char).
Byte-level BPE: text -> UTF-8 bytes -> start from 256 byte symbols and repeatedly merge the
most frequent adjacent pair until the vocabulary has `vocab_size` entries (Sennrich et al. 2016;
GPT-2's byte-level variant). Both are Hugging Face `tokenizers` objects, so tokenizer.json is
the file format the rest of the ecosystem reads.
"""

from __future__ import annotations

import base64
import json
import re
import sys
from array import array
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from .errors import CheckpointError, DataError, MonotileError


class Tokenizer:
    """A thin wrapper over `tokenizers.Tokenizer` that knows its kind and byte lengths, and,
    for decoding alone, can let it go (`let_go`)."""

    def __init__(self, tok: HFTokenizer | None, kind: str | None = None,
                 path: Path | None = None):
        """`tok` None: read from `path` when first used (Tokenizer.load(lazy=True))."""
        self._tok, self._kind, self.path = tok, kind, path
        self._vocab_size = None if tok is None else tok.get_vocab_size()
        self._pieces: tuple[bytes, array] | None = None  # let_go's table of token bytes
        self._specials: dict[int, str] | None = None

    @property
    def tok(self) -> HFTokenizer:
        """The Hugging Face tokenizer (read from its file at first use, and again after
        let_go)."""
        if self._tok is None:
            self._tok = Tokenizer.load(self.path)._tok
        return self._tok

    @property
    def kind(self) -> str:
        if self._kind is None:
            self._kind = _kind(self.tok)
        return self._kind

    @property
    def vocab_size(self) -> int:
        if self._vocab_size is None:
            self._vocab_size = self.tok.get_vocab_size()
        return self._vocab_size

    @classmethod
    def train_char(cls, text: str) -> Tokenizer:
        chars = sorted(set(text))
        tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[]))
        tok.decoder = decoders.Fuse()
        return cls(tok, "char")

    @classmethod
    def train_bpe(cls, text: str, vocab_size: int) -> Tokenizer:
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        # the tokenizers library's own bar, on a terminal only (it writes to stderr)
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=sys.stderr.isatty(),
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(text.splitlines(keepends=True), trainer)
        return cls(tok, "bpe")

    @classmethod
    def load(cls, path: str | Path, lazy: bool = False) -> Tokenizer:
        """tokenizer.json; `lazy`: read at first use (its file checked to exist now)."""
        if lazy:
            if not Path(path).is_file():
                raise CheckpointError(f"cannot read tokenizer {path}: no such file; the run's "
                                      "tokenizer.json is missing, retrain or restore it")
            return cls(None, None, Path(path))
        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise CheckpointError(f"cannot read tokenizer {path}: {e}; the run's tokenizer.json "
                                  "is missing or corrupt, retrain or restore it") from None
        # a tokenizer.json may pad or cut every text to a fixed length (MiniLM's pads to 128);
        # monotile pads its batches and crops to the model's context itself
        tok.no_padding()
        tok.no_truncation()
        return cls(tok, _kind(tok), Path(path))

    def save(self, path: str | Path) -> None:
        from .train.checkpoint import atomic_write_text
        atomic_write_text(Path(path), self.tok.to_str(pretty=True))

    def encode(self, text: str, special_tokens: bool = True) -> list[int]:
        """The ids of `text`; special_tokens=False leaves out what the tokenizer adds around a
        text (Llama's BOS), as a rendered chat template already holds them."""
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a command line's undecodable bytes, e.g. $'A\xffB'
            bad = text[e.start:e.end].encode("utf-8", "surrogateescape" if all(
                "\udc80" <= c <= "\udcff" for c in text[e.start:e.end]) else "backslashreplace")
            raise DataError(f"the text is not UTF-8: {bad!r} at character {e.start}; give "
                            "UTF-8 text") from None
        except AttributeError:
            raise DataError(f"expected text, got {type(text).__name__}") from None
        ids = self.tok.encode(text, add_special_tokens=special_tokens).ids
        if self.kind == "char" and len(ids) != len(text):
            vocab = self.tok.get_vocab()
            unknown = sorted({c for c in text if c not in vocab})
            raise MonotileError(f"text contains characters outside the model's vocabulary: "
                                f"{''.join(unknown)!r}; remove them (the model knows "
                                f"{len(vocab)} characters)")
        return ids

    def keep_known(self, text: str) -> tuple[str, set[str]]:
        """`text` without the characters a character vocabulary lacks (another text met by a
        trained model), and those characters; any other tokenizer encodes every text."""
        if self.kind != "char":
            return text, set()
        vocab = self.tok.get_vocab()
        unknown = {c for c in set(text) if c not in vocab}
        if not unknown:
            return text, unknown
        return "".join(c for c in text if c not in unknown), unknown

    def decode(self, ids: list[int]) -> str:
        """The text of `ids`, special tokens left out."""
        if self._pieces is not None:  # the bytes of each token, joined, read as UTF-8
            blob, ends = self._pieces
            return b"".join([blob[ends[i]:ends[i + 1]] for i in ids]).decode("utf-8", "replace")
        return self.tok.decode(list(ids))

    def special_texts(self) -> dict[int, str]:
        """id -> text of the special tokens that decoding leaves out (<|im_end|>, </s>)."""
        if self._specials is None:
            self._specials = {i: t.content for i, t in
                              self.tok.get_added_tokens_decoder().items() if t.special}
        return self._specials

    def let_go(self) -> bool:
        """Let the Hugging Face tokenizer go where decoding can do without it: a byte-level
        BPE's (GPT-2's family) read from a file, whose decode is the UTF-8 text of its
        tokens' bytes joined (decoders.ByteLevel: a token's characters mapped back through
        GPT-2's byte-to-unicode table, a token with a character outside it taken as its own
        UTF-8; special tokens left out; an incomplete character read as U+FFFD, as Rust's
        from_utf8_lossy reads it). decode then reads one table of those bytes (0.5 MB for
        SmolLM2's 49,152 tokens, where the tokenizer holds 15 MB: its vocabulary both ways,
        its merges, its pre-tokenizer), and encode reads the file again. `monotile generate`
        encodes the prompt and lets the tokenizer go in a child process (cli.common.apart),
        which hands it back pickled, so the decoding process never reads it. Returns whether
        it did (or had)."""
        if self._pieces is not None:
            return True
        if self.path is None or not _byte_level_decoder(self.tok):
            return False
        skip = self.special_texts()  # kept: a stop string matches a special token's text
        self.kind  # noqa: B018  (kept too, as vocab_size)
        alphabet = _bytes_to_unicode()
        to_bytes = {ord(c): b for b, c in alphabet.items()}  # str.translate's table
        spelled = re.compile(f"[{re.escape(''.join(alphabet.values()))}]*")
        blob, ends = bytearray(), array("I", [0])
        for i in range(self.vocab_size):  # a token at a time: no 49,152 strings at once,
            # whose room the allocator would keep among what stays
            token = "" if i in skip else (self._tok.id_to_token(i) or "")
            if spelled.fullmatch(token):  # each character one byte
                blob += token.translate(to_bytes).encode("latin-1")
            else:  # a token spelled outside the byte alphabet (an added one): its UTF-8
                blob += token.encode("utf-8")
            ends.append(len(blob))
        self._pieces, self._tok = (bytes(blob), ends), None
        return True

    def decoding_state(self) -> dict:
        """What a let-go tokenizer keeps, as JSON (cli.common.apart sends it so): read back
        by from_decoding_state."""
        if self._pieces is None:
            raise ValueError("let_go() first: only a tokenizer let go travels as its state")
        blob, ends = self._pieces
        return {"path": str(self.path), "kind": self.kind, "vocab_size": self.vocab_size,
                "specials": {str(i): t for i, t in self.special_texts().items()},
                "blob": base64.b64encode(blob).decode(), "ends": base64.b64encode(
                    ends.tobytes()).decode(), "ends_type": ends.typecode}

    @classmethod
    def from_decoding_state(cls, state: dict) -> Tokenizer:
        tok = cls(None, state["kind"], Path(state["path"]))
        tok._vocab_size = state["vocab_size"]
        tok._specials = {int(i): t for i, t in state["specials"].items()}
        ends = array(state["ends_type"])
        ends.frombytes(base64.b64decode(state["ends"]))
        tok._pieces = (base64.b64decode(state["blob"]), ends)
        return tok

    def token_bytes(self) -> list[int]:
        """UTF-8 length in bytes of each token id, for bits per byte (computed once)."""
        if getattr(self, "_token_bytes", None) is None:
            self._token_bytes = self._count_token_bytes()
        return self._token_bytes

    def _count_token_bytes(self) -> list[int]:
        out = [0] * self.vocab_size
        for token, i in self.tok.get_vocab().items():
            # byte-level tokens spell one byte per character (GPT-2's byte-to-unicode map)
            if self.kind == "bpe":
                out[i] = len(token)
            elif self.kind == "char":
                out[i] = len(token.encode("utf-8"))
            else:  # another Hugging Face tokenizer: the bytes its token decodes to
                out[i] = len(self.tok.decode([i], skip_special_tokens=False).encode("utf-8"))
        return out


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-to-unicode table: the 188 printable bytes ("!" to "~", "¡" to "¬", "®" to
    "ÿ") stand for themselves, the other 68 for U+0100 onward in byte order ("Ġ" is a space)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable},
            **{b: chr(256 + n) for n, b in enumerate(others)}}


def _byte_level_decoder(tok: HFTokenizer) -> bool:
    """Whether `tok` decodes with decoders.ByteLevel alone."""
    return tok.decoder is not None and json.loads(tok.decoder.__getstate__()).get(
        "type") == "ByteLevel"


def _kind(tok: HFTokenizer) -> str:
    """"char" for monotile's character vocabulary (a BPE without merges or pre-tokenizer),
    "bpe" for a byte-level BPE (GPT-2's family), "hf" for any other Hugging Face tokenizer.
    Read off the parts' own JSON: the whole tokenizer's (SmolLM2's 3.5 MB) parsed in Python
    took ~20 MB, and left some of it resident."""
    def spec(part) -> dict | None:
        return None if part is None else json.loads(part.__getstate__())

    pre = spec(tok.pre_tokenizer)
    if isinstance(tok.model, models.BPE) and pre is None \
            and not spec(tok.model).get("merges"):
        return "char"
    byte_level = "ByteLevel" in json.dumps(pre) or "ByteLevel" in json.dumps(spec(tok.decoder))
    return "bpe" if byte_level and tok.normalizer is None else "hf"
