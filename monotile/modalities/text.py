"""Text: a tokenizer, a causal language model on the trunk, and next-token prediction.

Model:   logits = Trunk(E[x]) W_out^T                (E the token embedding; W_out = E when tied)
Loss:    L = -(1/N) sum_t log p(x_{t+1} | x_<=t)    (cross-entropy of the next token, in nats)
Metrics: perplexity = exp(L);  bits per byte = sum_t -log2 p(x_{t+1} | x_<=t) / (UTF-8 bytes of
         the predicted tokens), which compares models across tokenizers.
Data:    one text file read whole, or a folder of token shards (`monotile prepare text`,
         text_shards.py) read memory-mapped, its tokenizer the run's.
"""

from __future__ import annotations

import dataclasses
import math
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.transformer import ModelConfig, Transformer, init_weights
from ..data import find_data, read_text
from ..errors import ConfigError, DataError, MonotileError
from ..infer.generate import Sampling, TextPieces, generate_ids
from ..tokenizers import Tokenizer
from .base import TaskBase, register
from .chat import PLAIN_STOP, PLAIN_TEMPLATE, ChatPrompt, read_jsonl, render
from .text_shards import TokenShards, is_shards



class Timings:
    """Fills `out` (when a dict) with the figures llama.cpp prints after a generation: the
    prompt's pass (to the first token) and the decoding of the tokens after it."""

    def __init__(self, out: dict | None, prompt_tokens: int):
        self.out, self.prompt_tokens = out, prompt_tokens
        self.start, self.first, self.last, self.tokens = time.perf_counter(), None, None, 0

    def tick(self) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last
        self.tokens += 1

    def done(self) -> None:
        if self.out is None:
            return
        prompt = (self.first or time.perf_counter()) - self.start
        decode = (self.last - self.first) if self.first else 0.0
        self.out.update(prompt_tokens=self.prompt_tokens, prompt_seconds=round(prompt, 4),
                        new_tokens=self.tokens, decode_seconds=round(decode, 4),
                        prompt_tokens_per_second=round(self.prompt_tokens / prompt, 2)
                        if prompt > 0 else None,
                        decode_tokens_per_second=round((self.tokens - 1) / decode, 2)
                        if decode > 0 else None)

@dataclass(frozen=True, kw_only=True)
class TextConfig:
    data: str = "tinyshakespeare/input.txt"  # a data set name (see monotile.data), a path,
                                             # or a folder of token shards (monotile prepare)
    tokenizer: str = "char"                  # char | bpe
    bpe_vocab: int = 4096                    # vocabulary size a BPE tokenizer is trained to
    val_fraction: float = 0.1                # the last fraction of the text (in characters),
                                             # or of the records of a .jsonl file
    eval_tokens: int | None = None           # cap on validation tokens per evaluation; None: all
    chat_template: str | None = None         # Jinja template of a conversation; set from
                                             # chat data (.jsonl with "messages") if None
    chat_stop: tuple = ()                    # strings that end an answer (the template's)
    eos_ids: tuple = ()                      # token ids that end generation (a checkpoint's
                                             # end-of-text and end-of-turn tokens)
    bos_token: str | None = None             # the special tokens a chat template may name,
    eos_token: str | None = None             #   as their text (a checkpoint's
    unk_token: str | None = None             #   tokenizer_config.json)
    pad_token: str | None = None
    model: str = "causal_lm"                 # causal_lm | encoder (sentence embeddings; imported)
    type_vocab: int = 0                      # encoder: token types (BERT's segments)
    pooler: bool = False                     # encoder: keeps BERT's pooler (for export)
    max_tokens: int | None = None            # encoder: tokens per text kept (None: the context)
    pad_id: int = 0                          # encoder: the padding token

    def __post_init__(self):
        object.__setattr__(self, "chat_stop", tuple(self.chat_stop))  # config.json gives lists
        object.__setattr__(self, "eos_ids", tuple(int(i) for i in self.eos_ids))
        if self.tokenizer not in ("char", "bpe", "hf"):
            raise ConfigError(f"tokenizer={self.tokenizer!r} is invalid: choose char or bpe "
                              "(hf marks an imported Hugging Face tokenizer)")
        if self.model not in ("causal_lm", "encoder"):
            raise ConfigError(f"model={self.model!r} is invalid: choose causal_lm or encoder")
        if self.bpe_vocab < 257:
            raise ConfigError(f"bpe_vocab={self.bpe_vocab} is invalid: a byte-level BPE needs "
                              "more than 256 entries")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction={self.val_fraction} is invalid: it must be in (0, 1)")
        if self.eval_tokens is not None and self.eval_tokens <= 0:
            raise ConfigError(f"eval_tokens={self.eval_tokens} is invalid: it must be positive")

    @property
    def template_tokens(self) -> dict[str, str]:
        """The special tokens a chat template sees, as transformers passes them (those set)."""
        return {name: text for name in ("bos_token", "eos_token", "unk_token", "pad_token")
                if (text := getattr(self, name)) is not None}


class LanguageModel(nn.Module):
    """Token embedding -> causal trunk -> linear head over the vocabulary."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.trunk = Transformer(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def forward(self, idx: torch.Tensor, *, cache=None, pos: int = 0,
                last: bool = False) -> torch.Tensor:
        """idx (B, T) token ids -> logits (B, T, vocab); with `last`, of the last position
        alone (B, 1, vocab): all a prompt's prefill needs, and the head is a fifth of a
        135M model's weights."""
        h = self.trunk(self.tok_emb(idx), causal=True, cache=cache, pos=pos)
        if last and h.size(1) > 1:  # (a decoding step's one position is the last already:
            h = h[:, -1:]           # the head reads the trunk's rows, not a slice of them)
        return self.head(h)


@register
class TextTask(TaskBase):
    """Next-token prediction on one text file, split by characters into train and validation,
    or on token shards; or, for an imported encoder (BERT, MiniLM), sentence embeddings."""

    name = "text"
    Config = TextConfig
    best_metric = ("val_loss", "min")
    what = "prompt"
    variable_length = True

    @property
    def routes(self) -> tuple[str, ...]:
        return ("embeddings",) if self.config.model == "encoder" else ("completions", "chat")

    @property
    def inference_rows(self) -> int:
        """An encoder reads a sentence at once (~32 tokens); a language model decodes a row."""
        return 32 if self.config.model == "encoder" else 1

    def __init__(self, config: TextConfig, tokenizer: Tokenizer, context: int):
        self.config, self.tokenizer, self.context = config, tokenizer, context
        self._splits: dict[str, torch.Tensor] = {}
        self._chat: dict[str, list] = {}  # chat data: per split, (ids, answer mask) records
        self._shards: TokenShards | None = None  # token shards, memory-mapped

    # ---- setting up -------------------------------------------------------------------------
    @classmethod
    def prepare(cls, config: TextConfig, model_cfg: ModelConfig, data: str | None = None):
        """Read the data and train the tokenizer; returns the task and the model config with
        its vocabulary size filled in."""
        path = find_data(config.data, data)
        if data is not None:  # remember where the user's file is
            config = dataclasses.replace(config, data=str(path))
        if is_shards(path):
            return cls._from_shards(config, model_cfg, path)
        examples = None
        if is_chat_data(path):  # instruction or chat records: the tokenizer learns their text
            config, examples = _read_chat(config, path)
            text = "".join(piece for e in examples for piece, _ in e.pieces)
            n_train = len(examples) - max(1, round(len(examples) * config.val_fraction))
            train_text = "".join(piece for e in examples[:n_train] for piece, _ in e.pieces)
        else:
            text = read_text(path)
            train_text = text[:_split_at(text, config.val_fraction)]
        if config.tokenizer == "hf" or config.model == "encoder":
            raise ConfigError("tokenizer=hf and model=encoder come with imported runs "
                              "(monotile import hf); train with tokenizer=char or bpe")
        if config.tokenizer == "char":
            tok = Tokenizer.train_char(text)
        else:
            tok = Tokenizer.train_bpe(train_text, config.bpe_vocab)
        task = cls(config, tok, model_cfg.context)
        if examples is not None:
            task._load_chat(examples)
        else:
            task._load_splits(text)
        return task, model_cfg.replace(vocab_size=_padded(model_cfg, tok.vocab_size))

    @classmethod
    def _from_shards(cls, config: TextConfig, model_cfg: ModelConfig, path: Path):
        """A run on token shards: their tokenizer is the run's (whatever `tokenizer` says),
        their vocabulary its vocab_size, their end-of-text token an end of generation."""
        if config.model == "encoder":
            raise ConfigError("model=encoder comes with imported runs; train causal_lm on shards")
        shards = TokenShards(path)
        shards.check(model_cfg.context)
        tok = Tokenizer.load(shards.tokenizer_path)
        eos = config.eos_ids or ((shards.eot,) if shards.eot is not None else ())
        config = dataclasses.replace(config, tokenizer=tok.kind, eos_ids=eos)
        task = cls(config, tok, model_cfg.context)
        task._shards = shards
        return task, model_cfg.replace(vocab_size=_padded(model_cfg, shards.vocab_size))

    @classmethod
    def load(cls, config: TextConfig, model_cfg: ModelConfig, run_dir: Path):
        # read at first use: building the model reads it, unless load's before_weights made
        # do without (monotile generate: in a child process)
        tok = Tokenizer.load(Path(run_dir) / "tokenizer.json", lazy=True)
        return cls(config, tok, model_cfg.context)

    def save(self, run_dir: Path) -> None:
        """The tokenizer, as tokenizer.json."""
        self.tokenizer.save(Path(run_dir) / "tokenizer.json")

    def build_model(self, cfg: ModelConfig) -> nn.Module:
        if cfg.vocab_size < self.tokenizer.vocab_size:  # more rows (padded, imported) is fine
            raise ConfigError(f"vocab_size={cfg.vocab_size} but the tokenizer has "
                              f"{self.tokenizer.vocab_size} tokens; leave vocab_size unset")
        if self.config.model == "encoder":
            from .embed import TextEncoder
            model = TextEncoder(cfg, self.config.type_vocab, self.config.pooler)
        else:
            model = LanguageModel(cfg)
        init_weights(model, cfg.n_layer)
        return model

    def embed(self, model, texts: list[str], batch_size: int = 32,
              progress: bool = False) -> torch.Tensor:
        """(N, d) unit-length sentence embeddings (mean pooling, L2 normalisation)."""
        if self.config.model != "encoder":
            raise ConfigError("this run is a language model; embeddings come from an encoder "
                              "run (import one with `monotile import hf`, e.g. MiniLM)")
        from .embed import embed_texts
        return embed_texts(model, self.tokenizer, texts, batch_size=batch_size,
                           max_tokens=self.config.max_tokens or self.context,
                           pad_id=self.config.pad_id, progress=progress)

    # ---- data -------------------------------------------------------------------------------
    def _load_splits(self, text: str | None = None) -> None:
        if self._splits or self._shards is not None:
            return
        path = find_data(self.config.data) if text is None else None
        if path is not None and is_shards(path):
            return self._open_shards(path)
        if text is None and is_chat_data(path):
            return self._load_chat()
        if text is None:
            text = read_text(path)
        kept, unknown = self.tokenizer.keep_known(text)  # a base model's vocabulary
        _warn_dropped(self.config.data, len(text) - len(kept), len(text), unknown)
        text = kept
        cut = _split_at(text, self.config.val_fraction)
        for split, part in (("train", text[:cut]), ("val", text[cut:])):
            ids = torch.tensor(self.tokenizer.encode(part), dtype=torch.long)
            if ids.numel() < self.context + 1:
                raise DataError(f"the {split} split of {self.config.data} has {ids.numel()} "
                                f"tokens, fewer than context + 1 = {self.context + 1}; give "
                                "more text or a smaller context")
            self._splits[split] = ids

    def _open_shards(self, path: Path) -> None:
        """A trained run's shards (resume, eval), checked to be tokenized by its tokenizer."""
        shards = TokenShards(path)
        shards.check(self.context)
        if Tokenizer.load(shards.tokenizer_path).tok.get_vocab() != self.tokenizer.tok.get_vocab():
            raise DataError(f"the shards in {path} were made with another tokenizer than this "
                            "run's; give the run the shards it was trained on")
        self._shards = shards

    def _load_chat(self, examples=None) -> None:
        """Records -> (token ids, answer mask) each, truncated to context + 1 tokens; the last
        val_fraction of the records is the validation split."""
        if examples is None:
            self.config, examples = _read_chat(self.config, find_data(self.config.data))
        n_val = max(1, round(len(examples) * self.config.val_fraction))
        splits, total, dropped, unknown = {"train": [], "val": []}, 0, 0, set()
        for i, e in enumerate(examples):
            ids, mask = [], []
            for j, (piece, answer) in enumerate(e.pieces):
                kept, missing = self.tokenizer.keep_known(piece)
                total, dropped = total + len(piece), dropped + len(piece) - len(kept)
                unknown |= missing
                # one text in pieces: the tokenizer's own special tokens (a BOS) before the
                # first piece of a prompt and completion only; a conversation as a template
                # rendered it, which writes its own (as prompt_ids encodes a ChatPrompt)
                first = j == 0 and not e.conversation
                piece_ids = self._ids(kept, special_tokens=first) if kept else []
                ids += piece_ids
                mask += [answer] * len(piece_ids)
            ids, mask = ids[:self.context + 1], mask[:self.context + 1]
            if any(mask[1:]):  # an answer token is left to predict
                split = "val" if i >= len(examples) - n_val else "train"
                splits[split].append((torch.tensor(ids), torch.tensor(mask)))
        _warn_dropped(self.config.data, dropped, total, unknown)
        for name, records in splits.items():
            if not records:
                raise DataError(f"the {name} part of {self.config.data} (the last val_fraction="
                                f"{self.config.val_fraction} of its records is for validation) "
                                f"has no record with an answer within the first "
                                f"{self.context + 1} tokens; give more or shorter records")
        self._chat = splits
        self._splits = {"train": torch.empty(0), "val": torch.empty(0)}

    def split(self, name: str) -> torch.Tensor:
        """A split's token ids, whole (shards are read whole here: small data and tests)."""
        self._load_splits()
        return self._shards.read(name) if self._shards is not None else self._splits[name]

    def _chat_batch(self, records) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T) right-padded with token 0; y the next tokens, -100 (ignored by the loss) at
        prompt tokens and padding."""
        T = max(len(ids) for ids, _ in records) - 1
        x = torch.zeros(len(records), T, dtype=torch.long)
        y = torch.full((len(records), T), -100, dtype=torch.long)
        for i, (ids, mask) in enumerate(records):
            n = len(ids) - 1
            x[i, :n] = ids[:-1]
            y[i, :n] = torch.where(mask[1:], ids[1:], -100)
        return x, y

    def batches(self, split: str, rng: torch.Generator, batch_size: int,
                rows: slice | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Random windows: x = data[i : i+T], y = data[i+1 : i+T+1], i uniform (nanoGPT);
        for chat data, records drawn uniformly with replacement. With `rows`, only those rows
        of each batch are made (a process's share: every process draws the same batch)."""
        self._load_splits()
        if self._chat:
            records = self._chat[split]
            while True:
                idx = torch.randint(len(records), (batch_size,), generator=rng).tolist()
                yield self._chat_batch([records[i] for i in idx[rows or slice(None)]])
        if self._shards is not None:
            yield from self._shards.windows(split, rng, batch_size, self.context, rows)
            return
        data, T, B = self.split(split), self.context, batch_size
        offsets = torch.arange(T + 1)
        while True:
            starts = torch.randint(len(data) - T, (B,), generator=rng)[rows or slice(None)]
            window = data[starts[:, None] + offsets]  # (B, T+1)
            yield window[:, :-1], window[:, 1:]

    def loss(self, model, batch) -> torch.Tensor:
        x, y = batch
        logits = model(x)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))

    def tokens(self, batch) -> int:
        return batch[0].numel()

    # ---- metrics ----------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model, progress: bool = False, batch_size: int = 32) -> dict[str, float]:
        """Loss over the validation split in consecutive windows: every token after the first
        is predicted once, from up to `context` tokens before it (in-window context)."""
        self._load_splits()
        if self._chat:
            return self._evaluate_chat(model, progress, batch_size)
        T, cap = self.context, self.config.eval_tokens
        if self._shards is not None:  # each shard on its own, read a batch at a time
            segments = self._shards.segments("val", cap)
        else:
            segments = [self.split("val")[: None if cap is None else cap + 1]]
        device = next(model.parameters()).device
        token_bytes = torch.tensor(self.tokenizer.token_bytes(), dtype=torch.float64,
                                   device=device)
        starts = [(data, s) for data in segments for s in range(0, len(data) - 1, T)]
        nll, count, n_bytes = 0.0, 0, 0.0
        for i in tqdm(range(0, len(starts), batch_size), disable=not progress, desc="eval",
                      unit="batch"):
            chunk = [_as_ids(data[s:s + T + 1]) for data, s in starts[i:i + batch_size]]
            for window in _same_length(chunk):
                x, y = window[:, :-1].to(device), window[:, 1:].to(device)
                logits = model(x).float()
                nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                       reduction="sum").item()
                count += y.numel()
                n_bytes += token_bytes[y].sum().item()
        loss = nll / count
        return {"val_loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": nll / math.log(2) / n_bytes, "val_tokens": float(count)}

    def _evaluate_chat(self, model, progress: bool, batch_size: int) -> dict[str, float]:
        """The loss over the answer tokens of the validation records (prompts not counted)."""
        device = next(model.parameters()).device
        token_bytes = torch.tensor(self.tokenizer.token_bytes(), dtype=torch.float64,
                                   device=device)
        records = self._chat["val"]
        nll, count, n_bytes = 0.0, 0, 0.0
        for i in tqdm(range(0, len(records), batch_size), disable=not progress, desc="eval",
                      unit="batch"):
            x, y = (t.to(device) for t in self._chat_batch(records[i:i + batch_size]))
            logits = model(x).float()
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1),
                                   reduction="sum").item()
            answer = y[y != -100]
            count += answer.numel()
            n_bytes += token_bytes[answer].sum().item()
        loss = nll / count
        return {"val_loss": loss, "perplexity": math.exp(loss),
                "bits_per_byte": nll / math.log(2) / n_bytes, "val_tokens": float(count)}

    # ---- using the model --------------------------------------------------------------------
    def chat_prompt(self, messages: list[dict]) -> ChatPrompt:
        """The conversation rendered by the run's chat template, ready for the answer."""
        if not self.config.chat_template:
            raise ConfigError("this run has no chat template (it was not trained on chat data); "
                              "generate from a plain prompt instead")
        return ChatPrompt(render(self.config.chat_template, messages, add_generation_prompt=True,
                                 tokens=self.config.template_tokens))

    def prompt_ids(self, prompt: str) -> list[int]:
        """The token ids of a prompt: a plain one with the special tokens the tokenizer adds to
        a text (Llama's BOS), a ChatPrompt without them, as transformers' apply_chat_template
        encodes a rendered conversation (its template writes its own)."""
        return self._ids(prompt, special_tokens=not isinstance(prompt, ChatPrompt))

    def _ids(self, text: str, special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, special_tokens=special_tokens)

    @property
    def special_texts(self) -> dict[int, str]:
        """id -> text of the special tokens that decoding leaves out (<|im_end|>, </s>)."""
        return self.tokenizer.special_texts()

    def text_pieces(self, stop: list[str] | None = None, ignore_eos: bool = False
                    ) -> TextPieces:
        """Generated ids to the text given out, ending before a stop string (a special token's
        text matches too) or at one of the run's end-of-sequence ids (eos_ids), unshown; with
        ignore_eos the end ids end nothing (llama.cpp's --ignore-eos)."""
        return TextPieces(self.tokenizer.decode, stop, specials=self.special_texts,
                          end_ids=() if ignore_eos else self.config.eos_ids)

    def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """A prompt's ids (a list of ids is taken as it is, checked against the vocabulary),
        its last `context` where it is longer."""
        ids = self._checked_ids(prompt) if isinstance(prompt, list) else self.prompt_ids(prompt)
        if not ids:
            raise MonotileError("the prompt is empty; give at least one character of text "
                                "(e.g. --prompt $'\\n' for a newline)")
        if len(ids) > self.context:
            warnings.warn(f"the prompt has {len(ids)} tokens, more than the context of "
                          f"{self.context}; only its last {self.context} tokens are used",
                          stacklevel=2)
            ids = ids[-self.context:]
        return ids

    def _checked_ids(self, ids: list) -> list[int]:
        vocab = self.tokenizer.vocab_size
        bad = next((i for i in ids if isinstance(i, bool) or not isinstance(i, int)
                    or not 0 <= i < vocab), None) if ids else None
        if bad is not None:
            raise DataError(f"the prompt's token {bad!r} is not an id of this run's vocabulary; "
                            f"give integers from 0 to {vocab - 1}")
        return list(ids)

    def stream(self, model, prompt: str | list[int], *, max_new_tokens: int = 200,
               sampling: Sampling = Sampling(), stop: list[str] | None = None,
               seed: int | None = None, use_cache: bool = True, ignore_eos: bool = False,
               timings: dict | None = None) -> Iterator[str]:
        """Yield the continuation of `prompt` (text, or its token ids) as text pieces, ending
        before a stop string or at an end-of-sequence id of the run (eos_ids; with
        ignore_eos, only at a stop string or after max_new_tokens). `timings`, a dict,
        receives as llama.cpp reports them:
        prompt_tokens and prompt_seconds (the prompt's forward pass and the first token),
        new_tokens and decode_seconds (the tokens after the first), and both rates per
        second."""
        if max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: it must be >= 0")
        ids = torch.tensor([self.encode_prompt(prompt)])
        pieces = self.text_pieces(stop, ignore_eos)
        clock = Timings(timings, ids.size(1))
        try:
            for token in generate_ids(model, ids, max_new_tokens, sampling, seed=seed,
                                      use_cache=use_cache):
                clock.tick()
                piece = pieces.push(int(token[0]))
                if piece:
                    yield piece
                if pieces.stopped:
                    return
            piece = pieces.flush()
            if piece:
                yield piece
        finally:
            clock.done()

    def read(self, source) -> str:
        """A prompt: text, its UTF-8 bytes, or JSON {"prompt": text}. A path to an image, a
        recording or a CSV is refused: it is a mistake here, not a prompt."""
        if isinstance(source, (bytes, bytearray)):
            try:
                return bytes(source).decode("utf-8")
            except UnicodeDecodeError:
                raise DataError("the prompt is not UTF-8 text") from None
        if isinstance(source, dict):
            source = source.get("prompt")
        if not isinstance(source, str):
            raise DataError("give the prompt as text, or as JSON {\"prompt\": text}")
        suffix = Path(source).suffix.lower()
        if suffix in FILE_SUFFIXES and Path(source).is_file():
            raise DataError(f"{source} is a {suffix} file, and this is a text run: give it a "
                            "prompt, or use a run of that file's modality")
        return source

    def predict(self, model, items: list[str], *, max_new_tokens: int = 200,
                temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                repetition_penalty: float = 1.0, stop: list[str] | None = None,
                seed: int | None = None, progress: bool = False) -> list[dict]:
        """The continuation of each prompt ({"text"}), sampled as `stream` samples; an
        encoder's unit-length embedding of each text instead ({"embedding"})."""
        if self.config.model == "encoder":
            return [{"embedding": v} for v in self.embed(model, items).tolist()]
        if not 0 <= max_new_tokens <= self.context:
            raise ConfigError(f"max_new_tokens={max_new_tokens} is invalid: predict continues a "
                              f"prompt by at most the context ({self.context} tokens); "
                              "`monotile generate` writes longer text")
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p,
                            repetition_penalty=repetition_penalty)
        return [{"text": "".join(self.stream(model, prompt, max_new_tokens=max_new_tokens,
                                             sampling=sampling, stop=stop, seed=seed))}
                for prompt in tqdm(items, disable=not progress or len(items) < 2,
                                   desc="generate", unit="prompt")]

    def summarize(self, results: list[dict], sources: list, skipped: list[dict]) -> dict:
        return {"predictions": [{"prompt": s, **r} for s, r in zip(sources, results)],
                "skipped": skipped}

    def format_predictions(self, summary: dict, fmt: str = "text") -> str:
        preds = summary["predictions"]
        if len(preds) == 1:
            return _shown(preds[0])
        return "\n".join(f"==> {p['prompt']} <==\n{_shown(p)}" for p in preds)

    # ---- explaining ---------------------------------------------------------------------------
    def example_inputs(self, model_cfg, batch: int, length: int | None):
        T = length or model_cfg.context
        ids = torch.randint(0, model_cfg.vocab_size, (batch, T))
        return ((ids, torch.ones_like(ids)) if self.config.model == "encoder" else (ids,)), T

    def head_activations(self, model_cfg) -> float | None:
        """A language model's logits and their gradient: 2 V values per token."""
        return None if self.config.model == "encoder" else 2 * model_cfg.vocab_size

    def attention_inputs(self, prompt: str) -> tuple:
        ids = self.tokenizer.encode(prompt)
        if not ids:
            raise DataError("the text is empty; give at least one character the model knows")
        if len(ids) > self.context:
            raise DataError(f"the text has {len(ids)} tokens, more than the context "
                            f"{self.context}; give a shorter one")
        x = torch.tensor([ids])
        return (x, torch.ones_like(x)) if self.config.model == "encoder" else (x,)

    def draw_attention(self, prompt, weights, outputs, title, *, top_k: int = 5):
        """The tokens x tokens map labelled with the tokens; for a language model, the
        likeliest next tokens at each position."""
        from ..train.plots import attention_heatmap, figure
        tok = self.tokenizer
        ids = tok.encode(prompt)
        labels = [_token_label(tok.decode([i])) for i in ids]
        size = min(14, 3 + 0.25 * len(ids))
        fig, ax = figure(size, size)
        attention_heatmap(ax, weights, labels, labels, title)
        out = {"tokens": labels, "attention": weights.tolist()}
        if self.config.model != "encoder":
            probs = outputs[0].float().softmax(-1)
            top = probs.topk(min(top_k, probs.size(-1)), dim=-1)
            out["next_tokens"] = [
                {"position": t, "token": labels[t],
                 "top": [{"token": _token_label(tok.decode([i])), "probability": p}
                         for i, p in zip(top.indices[t].tolist(), top.values[t].tolist())]}
                for t in range(len(ids))]
        return fig, out

    def format_explanation(self, result: dict) -> str:
        lines = [super().format_explanation(result)]
        for row in result.get("next_tokens", []):
            tops = "  ".join(f"{t['token']!s:>6} {t['probability']:.2f}" for t in row["top"])
            lines.append(f"  after {row['token']!s:>8}: {tops}")
        return "\n".join(lines)


# files that are not prompts: a text run refuses them by suffix (`read`)
FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".wav",
                 ".flac", ".ogg", ".mp3", ".csv", ".npz")


def _token_label(text: str) -> str:
    return repr(text)[1:-1] or "''"


def _shown(prediction: dict) -> str:
    if "embedding" in prediction:
        v = prediction["embedding"]
        return f"[{', '.join(f'{x:.4f}' for x in v[:6])}, ...] ({len(v)} dimensions)"
    return prediction["text"]


def _warn_dropped(data: str, dropped: int, total: int, unknown: set[str]) -> None:
    if dropped:
        warnings.warn(f"dropped {dropped:,} characters ({dropped / total:.2%}) of {data} outside "
                      f"the model's vocabulary: {''.join(sorted(unknown))!r}", stacklevel=3)


def _padded(model_cfg: ModelConfig, tokens: int) -> int:
    """The embedding's rows: the tokenizer's size, or the preset's vocab_size when that is
    larger (gpt2-124m pads GPT-2's 50,257 to 50,304, a multiple of 64, as nanoGPT does: the
    extra rows are never a target and their logits are pushed down in training)."""
    return max(model_cfg.vocab_size, tokens)


def is_chat_data(path: Path) -> bool:
    return Path(path).suffix.lower() == ".jsonl"


def _read_chat(config: TextConfig, path: Path):
    """The records of a .jsonl file, and the config with the chat template the run keeps (the
    plain one when records hold messages and none was given)."""
    template = config.chat_template or PLAIN_TEMPLATE
    examples = read_jsonl(path, template, config.template_tokens)
    if config.chat_template is None and any(e.conversation for e in examples):
        config = dataclasses.replace(config, chat_template=PLAIN_TEMPLATE,
                                     chat_stop=config.chat_stop or PLAIN_STOP)
    return config, examples


def _split_at(text: str, val_fraction: float) -> int:
    return int(len(text) * (1 - val_fraction))


def _as_ids(window) -> torch.Tensor:
    """A window of ids as an int64 tensor (a shard's window is a uint16 or uint32 array)."""
    return window if torch.is_tensor(window) else torch.from_numpy(window.astype(np.int64))


def _same_length(windows: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Stack the windows of each length, in the order the lengths come (the full ones first,
    then each segment's shorter last window)."""
    for n in dict.fromkeys(len(w) for w in windows):
        yield torch.stack([w for w in windows if len(w) == n])
