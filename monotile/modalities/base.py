"""The Task contract as code: what the trainer, the CLI, `explain`, the budget and the server
need from a modality, and the registry of modalities.

    Task                                         every run's modality
      name, Config, best_metric, config          its name, its config class (a frozen, JSON-
                                                 serialisable dataclass), the metric that picks
                                                 the best checkpoint, e.g. ("val_loss", "min")
      load(config, model_cfg, run_dir) -> Task   a trained or imported run's task (tokenizer...)
      save(run_dir)                              what load needs beyond config.json
      build_model(model_cfg) -> nn.Module        encoder + trunk + head
      read(source) -> item                       a file path, bytes or a JSON value -> one input
      predict(model, items, **options) -> list   one JSON-able result (a dict) per item
      evaluate(model, progress) -> dict          the figures users quote

    Trainable(Task)                              what `fit` and `monotile train` need on top
      prepare(config, model_cfg, data) -> (task, model_cfg)   reads the data, fixes the
                                                 vocabulary and whatever the model's shape needs
      batches(split, rng, batch_size) -> Iterator[batch]      randomness from rng alone; a
                                                 task that takes `rows` (a slice) makes only
                                                 those rows of each batch, a process's share
      loss(model, batch) -> Tensor
      tokens(batch) -> int                       tokens the trunk saw, for tokens/s

Everything else a caller needs from a modality is an optional hook with a default in TaskBase
below: which files `read` takes, how results are gathered and printed, the full report of
`monotile eval`, an example batch for the budget, the attention picture of `explain`, and which
of the server's routes the task answers. Two capabilities go with particular routes: a task
that generates text has `tokenizer`, `stream` and `chat_prompt` (TextGenerator); one that
embeds sentences has `embed` (Embedder).

A modality is one file: a Task class decorated with @register (and a preset, if it wants a
name to train by). Nothing outside monotile/modalities branches on a task's name.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from ..errors import ConfigError


# ---- the contract -----------------------------------------------------------------------------

@runtime_checkable
class Task(Protocol):
    """Every run's modality (see the module docstring)."""

    name: ClassVar[str]
    Config: ClassVar[type]
    best_metric: ClassVar[tuple[str, str]]
    config: Any

    @classmethod
    def load(cls, config, model_cfg, run_dir: Path) -> Task: ...

    def save(self, run_dir: Path) -> None: ...

    def build_model(self, cfg) -> nn.Module: ...

    def read(self, source) -> Any: ...

    def predict(self, model: nn.Module, items: list, **options) -> list[dict]: ...

    def evaluate(self, model: nn.Module, progress: bool = False) -> dict: ...


@runtime_checkable
class Trainable(Task, Protocol):
    """A Task that `monotile train` can train: `fit` draws batches and minimises the loss."""

    @classmethod
    def prepare(cls, config, model_cfg, data: str | None = None) -> tuple[Trainable, Any]: ...

    def batches(self, split: str, rng: torch.Generator, batch_size: int) -> Iterator: ...

    def loss(self, model: nn.Module, batch) -> torch.Tensor: ...

    def tokens(self, batch) -> int: ...


@runtime_checkable
class TextGenerator(Protocol):
    """A task whose model continues text: the completions and chat routes, `generate`."""

    tokenizer: Any

    def stream(self, model: nn.Module, prompt: str, **options) -> Iterator[str]: ...

    def chat_prompt(self, messages: list[dict]) -> str: ...


@runtime_checkable
class Embedder(Protocol):
    """A task whose model embeds sentences: the embeddings route, `embed`, `search`."""

    def embed(self, model: nn.Module, texts: list[str], batch_size: int = 32) -> torch.Tensor: ...


def members(protocol: type, *, of_class: bool = False) -> list[str]:
    """The names a protocol asks for: its annotated attributes and its methods; of_class:
    only what the class itself must have (not instance attributes such as `config`)."""
    names: set[str] = set()
    for klass in protocol.__mro__:
        if klass is Protocol or not getattr(klass, "_is_protocol", False):
            continue
        names |= {n for n, kind in getattr(klass, "__annotations__", {}).items()
                  if not of_class or str(kind).startswith("ClassVar")}
        names |= {n for n, v in vars(klass).items()
                  if not n.startswith("_") and (callable(v) or isinstance(v, classmethod))}
    return sorted(names)


def is_trainable(cls: type) -> bool:
    """Whether a Task class has everything `fit` needs (Trainable's members)."""
    return all(hasattr(cls, name) for name in members(Trainable, of_class=True))


# ---- the defaults of the optional hooks ---------------------------------------------------------

class TaskBase:
    """The optional hooks of a Task, each with its default; a modality overrides what it has.

    Inputs and results: `suffixes`, `sources`, `summarize`, `formats`, `format_predictions`,
    `rows`, `file_formats`, `output_files`. Evaluation: `report`, `format_report`. Explaining:
    `example_inputs` (the budget), `attention_inputs`, `draw_attention`, `format_explanation`,
    `head_activations`. Serving: `routes`."""

    name: ClassVar[str] = ""
    what: ClassVar[str] = "input"  # what `read` takes, for messages: "image", "audio"...
    suffixes: ClassVar[tuple[str, ...]] = ()  # the files `read` takes; folders are searched
    formats: ClassVar[tuple[str, ...]] = ("text", "json")  # `predict --format` choices
    file_formats: ClassVar[tuple[str, ...]] = ()  # what `predict --output-dir` writes (files)
    routes: ClassVar[tuple[str, ...]] = ()  # server routes beyond /v1/predictions, by API name:
    #   completions, chat, embeddings, transcriptions, classifications, forecasts (serve/)
    variable_length: ClassVar[bool] = False  # the budget may choose the sequence's length
    picture: ClassVar[str | None] = None  # the PNG `predict` draws into RUN/plots (its `plot`)
    origin: ClassVar[str] = "train one with `monotile train`"  # how a run of it is made
    # rows of x through a linear layer in a typical inference call: 1 for a decoding step;
    # or {layer name pattern: rows} (infer/packed.py rows_of). optimize_for_inference lays
    # weights out (and measures that layout) for it
    inference_rows: int | dict[str, int] = 1

    def __init__(self, config):
        self.config = config

    @classmethod
    def load(cls, config, model_cfg, run_dir: Path):
        """A trained run's task; by default one whose whole state is its config."""
        return cls(config)

    def save(self, run_dir: Path) -> None:
        """Write what `load` needs beyond config.json (a tokenizer); nothing by default."""

    # ---- inputs and results ----------------------------------------------------------------
    def sources(self, inputs: list) -> list:
        """What `predict`'s command-line inputs name, each to be `read`: files as given and
        folders searched recursively for `suffixes`; without suffixes, the inputs as given."""
        if not self.suffixes:
            return list(inputs)
        from ..data import expand_inputs
        return expand_inputs(inputs, self.suffixes, self.what)

    def summarize(self, results: list[dict], sources: list, skipped: list[dict]) -> dict:
        """Everything `Run.predict` returns: {"predictions": each result with the file it came
        from ("path") or the input as given ("input"), "skipped": [{"path", "error"}]}."""
        return {"predictions": [{"path": str(s), **r} if isinstance(s, Path) else
                                {"input": s, **r} for s, r in zip(sources, results)],
                "skipped": skipped}

    def format_predictions(self, summary: dict, fmt: str = "text") -> str:
        """How `monotile predict` prints a summary in a --format other than json: by default
        one line per prediction, its fields as key=value."""
        lines = []
        for r in summary["predictions"]:
            where = r.get("path", r.get("input"))
            fields = "  ".join(f"{k}={_short(v)}" for k, v in r.items()
                               if k not in ("path", "input"))
            lines.append(f"{where}  {fields}")
        return "\n".join(lines)

    def rows(self, summary: dict) -> tuple[list[str], list[list]]:
        """The predictions as CSV rows for `predict --output`: (header, rows); by default the
        fields of the results that are plain numbers or strings."""
        preds = summary["predictions"]
        header = [k for k in dict.fromkeys(k for r in preds for k in r)
                  if all(isinstance(r.get(k, ""), (str, int, float)) for r in preds)]
        return header, [[r.get(k, "") for k in header] for r in preds]

    def output_files(self, summary: dict, fmt: str) -> dict[str, str]:
        """{file name: text} that `predict --output-dir` writes for a summary in `fmt` (one of
        file_formats); a task without file formats writes none."""
        raise ConfigError(f"--output-dir is not supported by {self.name} runs; print the "
                          "predictions, or write them as CSV with --output")

    # ---- evaluation ---------------------------------------------------------------------------
    def report(self, model: nn.Module, run_dir: Path, *, data: str | None = None,
               progress: bool = False) -> dict:
        """The full evaluation `monotile eval` prints (per-class figures, plots in
        RUN/plots/); by default evaluate(). `data` evaluates other data where the task can."""
        if data is not None:
            raise ConfigError(f"--data is not supported by `eval` for {self.name} runs; it "
                              "evaluates on the run's own validation split")
        return self.evaluate(model, progress=progress)

    def format_report(self, figures: dict) -> str:
        """`monotile eval`'s table: a line per figure, then per-class figures if any."""
        figures = dict(figures)
        per_class = figures.pop("per_class", None)
        lines = [f"{k:>14}  {v:.4f}" if isinstance(v, float) else f"{k:>14}  {v}"
                 for k, v in figures.items()]
        if per_class:
            lines += ["", f"{'class':>14}  precision  recall      f1  support"]
            lines += [f"{name:>14}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  "
                      f"{m['support']:7d}" for name, m in per_class.items()]
        return "\n".join(lines)

    # ---- explaining -------------------------------------------------------------------------
    def example_inputs(self, model_cfg, batch: int, length: int | None) -> tuple[tuple, int]:
        """A batch of `batch` random inputs the model takes, for `explain --budget`:
        (the model's arguments, tokens per sequence in the trunk), with `length` tokens where
        the task lets the length vary (variable_length)."""
        raise ConfigError(f"a budget for {self.name} runs is not supported: the task does not "
                          "say what its model's input looks like (example_inputs)")

    def head_activations(self, model_cfg) -> float | None:
        """Values per token the head keeps for backward, if the task knows better than the
        layers' inputs and outputs measured by the budget (None)."""
        return None

    def attention_inputs(self, item) -> tuple:
        """The model's arguments for one item, as `explain` runs it (a batch of one)."""
        raise ConfigError(f"explain does not support {self.name} runs: the task does not say "
                          "how to run its model on one input (attention_inputs)")

    def draw_attention(self, item, weights: torch.Tensor, outputs, title: str, *,
                       top_k: int = 5) -> tuple[Any, dict]:
        """A matplotlib figure of one attention map `weights` (Tq, Tk) over `item`, and the
        figures to report with it; by default the map as a heat map, queries by keys."""
        from ..train.plots import attention_heatmap, figure
        fig, ax = figure(6, 6)
        attention_heatmap(ax, weights, None, None, title)
        return fig, {"attention": weights.tolist()}

    def format_explanation(self, result: dict) -> str:
        """`monotile explain`'s lines for people: the layer, the head and the picture."""
        return f"layer {result['layer']}, {result['head']}: {result['plot']}"


def _short(value) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ---- the registry ------------------------------------------------------------------------------

TASKS: dict[str, type] = {}


def register(cls: type) -> type:
    """Register a Task class under its `name` (a class decorator); a name is taken once."""
    name = getattr(cls, "name", "")
    if not name or not isinstance(name, str):
        raise ValueError(f"{cls.__name__} has no task name (a `name` class attribute)")
    if TASKS.get(name, cls) is not cls:
        raise ValueError(f"task {name!r} is registered already ({TASKS[name].__name__})")
    missing = [m for m in members(Task, of_class=True) if not hasattr(cls, m)]
    if missing:
        raise TypeError(f"{cls.__name__} lacks {', '.join(missing)} of the Task contract")
    TASKS[name] = cls
    return cls


def task_class(name: str) -> type:
    """The registered Task class called `name`; ConfigError naming the choices otherwise."""
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(TASKS)} (a task of "
                          "another package: name its module in $MONOTILE_MODALITIES)")
    return TASKS[name]


def takes(fn, option: str) -> bool:
    """Whether `fn` takes the keyword `option` (or any keyword)."""
    params = inspect.signature(fn).parameters
    return option in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _fits(value, kind) -> bool:
    """Whether a JSON-like value fits a plain annotation: None, bool, int, float, str, Path,
    list[...] and unions of them (anything else is not checked)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, k) for k in args)
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value) if args \
            else isinstance(value, list)
    if kind is bool:
        return isinstance(value, bool)
    if kind in (int, float):
        return isinstance(value, (int, float) if kind is float else int) and \
            not isinstance(value, bool)
    if kind in (str, Path):
        return isinstance(value, (str, Path))
    return True


def check_options(fn, options: dict, what: str, flag=lambda n: "--" + n.replace("_", "-")
                  ) -> None:
    """Refuse by name an option `fn` does not take, or one whose value does not fit its
    annotation: a flag or a request's option that does not apply is a one-line error, never a
    TypeError deep inside. `flag` names an option as the user wrote it."""
    for name, value in options.items():
        if not takes(fn, name):
            known = [n for n, p in inspect.signature(fn).parameters.items()
                     if p.kind is p.KEYWORD_ONLY and n != "progress"]
            raise ConfigError(f"{flag(name)} does not apply to {what}"
                              + (f" (its options: {', '.join(known)})" if known else ""))
        try:
            kind = typing.get_type_hints(fn).get(name)
        except Exception:  # an annotation that does not resolve: not checked
            kind = None
        if kind is not None and not _fits(value, kind):
            raise ConfigError(f"{name}={value!r} is invalid for {what}: expected "
                              f"{getattr(kind, '__name__', str(kind))}")


def call_with_options(fn, *args, what: str, **options):
    """fn(*args, **options) once check_options passes."""
    check_options(fn, options, what)
    return fn(*args, **options)
