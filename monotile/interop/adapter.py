"""Checkpoint formats as tables: one adapter per model family, walked one way to import and
the other way to export, so that each name and each layout change is written once.

    import   ours[rule.ours] = cat(part.pair.forward(theirs[part.name]) for part in rule.parts)
    export   theirs[part.name] = part.pair.inverse(chunk)  for chunk, part in split(ours, rows)

A rule names one of our tensors and the tensor(s) of the other format it is made of. Names
hold `{i}` for a block index (`{e}` for an encoder's block in an encoder-decoder) and `{p}` for
a prefix some files carry and others do not (`transformer.`, `bert.`, `model.`):

    one("trunk.blocks.{i}.attn.wo.weight", "model.layers.{i}.self_attn.o_proj.weight", ("d", "q"))

A layout change is declared once as a Pair (forward on import, inverse on export). Several
parts are fused: their rows concatenated on import (q | k | v) and split back by each part's
row count on export. A part the other format lacks (Whisper's k bias) is zeros on import and
refused unless zero on export. Shapes are written in the names of the family's sizes (`dims`:
"d", "V", "ff", ...), so a tensor of another shape, a missing one, or one that no rule takes
is refused by name and a checkpoint is never half-loaded.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from ..core.transformer import ModelConfig
from ..errors import CheckpointError, ConfigError

INDICES = {"i": "layers", "e": "encoder_layers"}  # a name's index -> the dims entry counting it


@dataclass(frozen=True)
class Pair:
    """One layout change, declared once: forward on import, inverse on export; both are given
    the tensor and the family's dims."""

    forward: Callable[[torch.Tensor, dict], torch.Tensor]
    inverse: Callable[[torch.Tensor, dict], torch.Tensor]


SAME = Pair(lambda w, dims: w, lambda w, dims: w)


@dataclass(frozen=True)
class Part:
    """One tensor of the other format. name None: a part that format lacks (zeros here)."""

    name: str | None
    shape: tuple = ()             # theirs, in ints and dims' names; () = not checked
    pair: Pair = SAME
    why: str = ""                 # for a lacking part: why a non-zero one cannot be exported
    label: str = ""               # for a lacking part: which part it is ("k")


@dataclass(frozen=True)
class Rule:
    """One of our tensors and the parts it is made of (one: renamed; several: rows fused)."""

    ours: str
    parts: tuple[Part, ...]
    when: str | None = None       # a dims flag: only models that have the tensor ("qkv_bias")
    optional: bool = False        # taken when the checkpoint has it, written when we have it
    fallback: str | None = None   # our tensor that stands in when theirs is absent
    tie: str | None = None        # ours *is* this tensor of ours: nothing to write; a part
                                  #   present in their checkpoint must equal it
    note: str = ""                # added to the message when their tensor is missing


def one(ours: str, theirs: str, shape: tuple = (), pair: Pair = SAME, **rule) -> Rule:
    return Rule(ours, (Part(theirs, shape, pair),), **rule)


def fuse(ours: str, *parts: Part, **rule) -> Rule:
    return Rule(ours, parts, **rule)


def lacking(label: str, shape: tuple, why: str) -> Part:
    return Part(None, shape, why=why, label=label)


def tie(ours: str, to: str, checked: str | None = None, **rule) -> Rule:
    return Rule(ours, (Part(checked),) if checked else (), tie=to, **rule)


def affine(ours: str, theirs: str | list[str], shape: tuple, pair: Pair = SAME,
           bias: bool | str = True, **rule) -> list[Rule]:
    """A layer's weight (their `shape`) and bias (its first size), from one layer of theirs or
    from several fused by rows (a list: q | k | v); bias is True, False or a dims flag."""
    names = [theirs] if isinstance(theirs, str) else theirs
    rules = [Rule(f"{ours}.weight", tuple(Part(f"{t}.weight", shape, pair) for t in names),
                  **rule)]
    if bias:
        rules.append(Rule(f"{ours}.bias", tuple(Part(f"{t}.bias", shape[:1]) for t in names),
                          **rule, **({"when": bias} if isinstance(bias, str) else {})))
    return rules


@dataclass(frozen=True)
class Adapter:
    """A model family in both directions: its tensor table, its config translation (config.json
    to our configs and back, side by side in the family's module) and the runs it exports."""

    name: str                     # "GPT-2", for messages
    model_types: tuple[str, ...]  # Hugging Face model_type values it reads
    task: str                     # the run it makes and exports: "text", "vision", ...
    rules: tuple[Rule, ...]
    model_in: Callable            # config.json -> ModelConfig, refusing what the trunk lacks
    task_in: Callable             # (Checkpoint, ModelConfig, Tokenizer | None) -> task config
    config_out: Callable          # (ModelConfig, task config, kept files) -> (config.json,
                                  #   {name: other JSON file})
    build: Callable               # (ModelConfig, task config) -> the model, to load into
    shape: str                    # what it exports: "GPT-2-shaped (learned positions, ...)"
    requires: dict                # setting -> the values it can hold, for `misfits`
    claims: dict = dataclasses.field(default_factory=dict)  # settings of the runs it exports
    task_dims: Callable = lambda task_cfg: {}
    prefix: str = ""              # `{p}`: read when their names carry it
    writes_prefix: bool = True    # and written on export
    ignored: tuple[str, ...] = ()  # their buffers and tied copies, dropped (fnmatch patterns)
    unexpected: str = "the trunk does not, so it is not imported"
    tokenizer: str | None = ("the tokenizer beside the weights "
                             "(tokenizer.save_pretrained(DIR))")  # how to save it; None: none
    keep: tuple[str, ...] = ()    # checkpoint files kept in the run, for export

    def dims(self, cfg: ModelConfig, task_cfg=None) -> dict:
        return {**trunk_dims(cfg), **self.task_dims(task_cfg)}

    def misfits(self, settings: dict, wanted: dict | None = None) -> list[str]:
        """The settings of a run (`name=value`) this family cannot hold; [] when it fits."""
        wanted = self.requires if wanted is None else wanted
        return [f"{k}={settings[k]}" for k, ok in wanted.items() if settings[k] not in ok]


def trunk_dims(cfg: ModelConfig) -> dict:
    """The sizes and flags that rules' shapes and `when` name."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim
    return {"d": cfg.d_model, "3d": 3 * cfg.d_model, "V": cfg.vocab_size, "ctx": cfg.context,
            "ff": cfg.hidden, "layers": cfg.n_layer, "heads": cfg.n_head,
            "kv_heads": cfg.kv_heads, "q": q, "kv": kv,
            "qkv_bias": cfg.bias if cfg.qkv_bias is None else cfg.qkv_bias,
            "tied": cfg.tie_embeddings, "untied": not cfg.tie_embeddings}


def run_settings(configs: dict) -> dict:
    """The fields of a run's task and trunk configs by bare name, with `grouped_query`."""
    cfg, task = configs["model"], [c for s, c in configs.items() if s not in ("model", "train")]
    return {**(dataclasses.asdict(task[0]) if task else {}), **dataclasses.asdict(cfg),
            "grouped_query": cfg.kv_heads != cfg.n_head}


# ---- walking the table -----------------------------------------------------------------------

def _expand(rules, dims: dict, prefix: str):
    """(rule, our name, their names) for every block index the names hold."""
    for rule in rules:
        if rule.when and not dims[rule.when]:
            continue
        keys = [k for k in INDICES if "{" + k + "}" in rule.ours]
        for index in itertools.product(*(range(dims[INDICES[k]]) for k in keys)):
            at = dict(zip(keys, index), p=prefix)
            yield rule, rule.ours.format(**at), [
                None if part.name is None else part.name.format(**at) for part in rule.parts]


def _size(shape: tuple, dims: dict) -> tuple:
    return tuple(dims[s] if isinstance(s, str) else s for s in shape)


def _take(t: dict, name: str, shape: tuple, note: str = "") -> torch.Tensor:
    if name not in t:
        raise CheckpointError(f"tensor {name!r} is missing from the checkpoint"
                              + (f"; {note}" if note else ""))
    w = t.pop(name).float()
    if shape and tuple(w.shape) != shape:
        raise CheckpointError(f"tensor {name!r} has shape {tuple(w.shape)}, the config implies "
                              f"{shape}")
    return w


def tensors_in(adapter: Adapter, dims: dict, tensors: dict) -> dict[str, torch.Tensor]:
    """Their tensor names and layouts -> our state dict; every tensor taken by exactly one rule
    (or ignored by name), else refused."""
    t = dict(tensors)
    p = adapter.prefix if any(k.startswith(adapter.prefix) for k in t) else ""
    out = {}
    for rule, ours, names in _expand(adapter.rules, dims, p):
        if rule.tie:
            out[ours] = out[rule.tie]
            for name in filter(None, names):
                if name in t and not torch.equal(t.pop(name).float(), out[ours]):
                    raise CheckpointError(
                        f"tensor {name!r} differs from the token embedding; {adapter.name}'s "
                        "output projection is tied to it (untied heads are not supported)")
            continue
        present = all(n in t for n in names if n is not None)
        if rule.optional and not present:
            continue
        if rule.fallback and not present:
            out[ours] = out[rule.fallback]
            continue
        chunks = [torch.zeros(_size(part.shape, dims)) if name is None else
                  part.pair.forward(_take(t, name, _size(part.shape, dims), rule.note), dims)
                  for part, name in zip(rule.parts, names)]
        out[ours] = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
    for name in [k for k in t if any(fnmatchcase(k, g.format(p=p)) for g in adapter.ignored)]:
        t.pop(name)
    if t:
        raise CheckpointError(f"unexpected tensor {min(t)!r} in the checkpoint; this "
                              f"model has parts {adapter.unexpected}")
    return out


def tensors_out(adapter: Adapter, dims: dict, sd: dict) -> dict[str, torch.Tensor]:
    """Our state dict -> their names and layouts: the same table, walked backwards. Refuses a
    non-zero part their format has no place for, before anything is written."""
    out = {}
    for rule, ours, names in _expand(adapter.rules, dims,
                                     adapter.prefix if adapter.writes_prefix else ""):
        if rule.tie or (rule.optional and ours not in sd):
            continue
        rows = [_size(part.shape, dims)[0] for part in rule.parts] if len(names) > 1 else None
        chunks = sd[ours].split(rows) if rows else [sd[ours]]
        for part, name, chunk in zip(rule.parts, names, chunks):
            if name is not None:
                out[name] = part.pair.inverse(chunk, dims).contiguous()
            elif chunk.abs().max() > 0:
                raise ConfigError(f"{ours}'s {part.label} part is not zero; {part.why}, so "
                                  "transformers cannot hold this model")
    return out


# ---- config.json, key by key -------------------------------------------------------------------

# transformers' names for the trunk's sizes, shared by most of its configs
TRUNK_KEYS = (("n_layer", "num_hidden_layers"), ("n_head", "num_attention_heads"),
              ("d_model", "hidden_size"), ("d_ff", "intermediate_size"))
# their activation names -> our mlp; export writes the first name of ours
GELU = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
RESOLVED = {"d_ff": "hidden", "n_kv_head": "kv_heads"}  # ModelConfig's None -> the size used


def keys_in(config: dict, keys) -> dict:
    """Our settings from config.json by a table of (ours, theirs[, default when absent])."""
    missing = [k[1] for k in keys if len(k) == 2 and k[1] not in config]
    if missing:
        raise ConfigError(f"config.json has no {missing[0]}; give the config.json that "
                          "transformers saved with the weights")
    return {k[0]: config[k[1]] if len(k) == 2 else config.get(k[1], k[2]) for k in keys}


def keys_out(cfg, keys) -> dict:
    """config.json's entries from our settings, by the same table (d_ff and n_kv_head as the
    trunk resolves them)."""
    return {k[1]: getattr(cfg, RESOLVED.get(k[0], k[0])) for k in keys}


def value_in(table: dict, key: str, value, family: str = "") -> str:
    """Their value of a setting -> ours, or a ConfigError naming it."""
    if value not in table:
        raise ConfigError(f"{family}{key}={value!r} is not supported")
    return table[value]


def value_out(table: dict, ours: str) -> str:
    return next(theirs for theirs, mine in table.items() if mine == ours)
