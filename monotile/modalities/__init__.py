"""The Task contract: what the trainer, the CLI and the server need from a modality.

    class Task(Protocol):
        name: str                                  # "text", "vision", ...
        config: TaskConfig                         # JSON-serialisable, validated
        best_metric: tuple[str, str]               # e.g. ("val_loss", "min")
        def build_model(self, cfg: ModelConfig) -> nn.Module
        def batches(self, split, rng, batch_size) -> Iterator[Batch]  # randomness from rng only
        def loss(self, model, batch) -> Tensor
        def tokens(self, batch) -> int                     # tokens the trunk saw, for tokens/s
        def evaluate(self, model, progress=False) -> dict[str, float]
        def predict(self, model, inputs, **options) -> list
        def save(self, run_dir) / classmethod load(config, run_dir)  # tokenizer and the like
        def report(self, model, run_dir, data=None, progress=False) -> dict   # optional: the
            # full evaluation `monotile eval` prints (per-class figures, plots); default evaluate

A modality is one file here with one Task class registered in TASKS.
"""

from __future__ import annotations

from ..errors import ConfigError


def task_class(name: str):
    from .text import TextTask
    from .series import SeriesTask
    from .speech import SpeechTask
    from .vision import VisionTask
    from .whisper import TranscribeTask
    tasks = {"text": TextTask, "vision": VisionTask, "speech": SpeechTask, "series": SeriesTask,
             "transcribe": TranscribeTask}
    if name not in tasks:
        raise ConfigError(f"unknown task {name!r}; choose one of: {', '.join(sorted(tasks))}")
    return tasks[name]
