"""monotile: one Transformer trunk for text, images, speech and time series.

    import monotile
    run = monotile.train("text", preset="shakespeare-char")
    print(run.evaluate()["val_loss"], run.generate("ROMEO:", max_new_tokens=100, seed=0))
    run = monotile.load("runs/shakespeare-char")
    ft = monotile.finetune("runs/shakespeare-char", "speeches.txt", rank=8)   # LoRA
"""

from .version import __version__
from .errors import MonotileError
from .run import Run, load, resume, train
from .adapt import finetune, merge

__all__ = ["MonotileError", "Run", "finetune", "load", "merge", "resume", "train",
           "__version__"]
