"""The `monotile` command: thin verbs over the Python API (monotile.train, load, resume).

Each verb is a pair in one of the modules here, its arguments beside its handler:
prepare.py (prepare), training.py (train, resume, finetune, merge, quantize, scaling),
using.py (eval, generate, predict, embed, search, explain), chat.py (chat), service.py
(import, export, consolidate, serve, data, presets). A verb
asks the run's task for whatever differs between modalities (which files it reads, how its
results print); none of them branches on a task's name.

Every user error is one line on stderr and exit status 2; figures go to stdout, as one JSON
object with --json.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

from ..errors import MonotileError
from . import chat, prepare, service, training, using

# the verbs in the order `monotile --help` lists them
VERBS = (prepare.prepare, training.train, training.resume, using.eval_, using.generate,
         chat.chat, using.predict, training.finetune, training.merge, training.quantize,
         using.embed, using.search, service.import_, service.export, service.consolidate,
         using.explain, training.scaling, service.serve, service.data, service.presets)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="monotile", description="One Transformer trunk for text, "
                                "images, speech and time series.")
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for verb in VERBS:
        verb(sub)
    completion = sub.add_parser("completion", help="print a shell's completion script: eval "
                                "\"$(monotile completion bash)\" in ~/.bashrc (or zsh)")
    completion.add_argument("shell", choices=["bash", "zsh"])
    completion.set_defaults(handler=lambda a: print(_completion_script(a.shell)))
    return p


def version_line() -> str:
    """monotile's version, and the PyTorch and Python it runs on (read without importing
    torch, so --version answers at once)."""
    from importlib.metadata import PackageNotFoundError, version

    from ..version import __version__
    try:
        torch = version("torch")
    except PackageNotFoundError:
        torch = "not installed"
    return (f"monotile {__version__} (torch {torch}, python "
            f"{'.'.join(map(str, sys.version_info[:3]))})")


def _completion_script(shell: str) -> str:
    """The verbs, their flags and their choices as a bash or zsh completion script (shtab
    reads them from the parser itself, so it never falls behind)."""
    import shtab
    return shtab.complete(parser(), shell=shell)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if (argv is None and args.command == "serve"
            and not {"OMP_WAIT_POLICY", "GOMP_SPINCOUNT"} & os.environ.keys()):
        # A server's threads (the event loop, one engine per model, uploads) share the cores
        # with whatever else runs there, and OpenMP workers that spin for long while they
        # wait starve them: decoding ran 20-30x slower under load (bench/serve.py). Passive
        # workers sleep, but each of a SmolLM2 step's ~150 parallel regions then waits ~50 us
        # for one to wake (13 ms a token instead of 5). So they spin 10,000 times (~0.1 ms),
        # long enough to find a step's next region, then sleep. On 2 cores: one client 72
        # tokens/s passive, 195 so; beside a 2-thread matmul process, 42-49 and 55-82.
        # libgomp reads the settings when torch loads it, so the server starts again with them.
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["GOMP_SPINCOUNT"] = "10000"
        os.execv(sys.executable, [sys.executable, "-m", "monotile", *sys.argv[1:]])
    warnings.formatwarning = lambda msg, cat, *rest: f"warning: {msg}\n"
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    try:
        code = args.handler(args)  # a verb may give its own status (130: stopped by Ctrl-C)
    except MonotileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    finally:
        if "torch" in sys.modules:  # leave torchrun's process group cleanly
            from ..train.distributed import shutdown
            shutdown()
    return code if isinstance(code, int) else 0


if __name__ == "__main__":
    sys.exit(main())
