"""The modalities: how each kind of data becomes tokens and comes back, one file each.

The contract every modality meets is code, in base.py: `Task` (what every run's modality is:
load, save, build_model, read, predict, evaluate), `Trainable` (what `fit` needs on top:
prepare, batches, loss, tokens), the capabilities `TextGenerator` and `Embedder`, and
`TaskBase`, the optional hooks with their defaults. TASKS is the registry by name; importing
this package registers the built-in modalities:

    text        text.py       a causal language model (or an imported sentence encoder)
    vision      vision.py     a Vision Transformer classifier
    speech      speech.py     a CTC speech recogniser
    series      series.py     a patch forecaster with quantiles
    transcribe  whisper.py    an imported Whisper (encoder-decoder), not trained here

A new modality is one file with a Task class decorated by @register. Importing it registers
it; so that `monotile` itself imports it, name its module in $MONOTILE_MODALITIES (comma-
separated), or give its package an entry point in the group "monotile.modalities". Then every
command, `explain`, the budget and the server take it (tests/test_a_modality_is_one_file.py).
"""

from __future__ import annotations

from .base import (TASKS, Embedder, Task, TaskBase, TextGenerator, Trainable, call_with_options,
                   check_options, is_trainable, members, register, takes, task_class)
# isort: off  (the order they register in is the order `monotile train --help` lists them)
from . import text, vision, speech, series, whisper  # noqa: F401
# isort: on


def load_plugins() -> list[str]:
    """Import the modalities of other modules, which register themselves: the entry points of
    the group "monotile.modalities", then the modules named in $MONOTILE_MODALITIES. A module
    that cannot be imported is a warning, not a crash. Returns the modules imported."""
    import importlib
    import os
    import warnings
    from importlib.metadata import entry_points
    names = [ep.value for ep in entry_points(group="monotile.modalities")]
    names += [n.strip() for n in os.environ.get("MONOTILE_MODALITIES", "").split(",")
              if n.strip()]
    loaded = []
    for name in dict.fromkeys(names):
        try:
            importlib.import_module(name.split(":")[0])
            loaded.append(name)
        except Exception as e:  # a broken plugin must not take the built-in modalities down
            warnings.warn(f"the modality module {name!r} could not be imported ({e}); check "
                          "$MONOTILE_MODALITIES and the plugin's installation", stacklevel=2)
    return loaded


load_plugins()

__all__ = ["TASKS", "Embedder", "Task", "TaskBase", "TextGenerator", "Trainable",
           "call_with_options", "check_options", "is_trainable", "load_plugins", "members",
           "register", "takes", "task_class"]
