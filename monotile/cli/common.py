"""What the verbs share: printing figures, the common flags, writing --output files, and work
done in a child process."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
from pathlib import Path

from ..errors import MonotileError


def print_json(obj) -> None:
    """One line of strict JSON: NaN and infinities (a loss on no data, an undefined metric)
    are null, as JSON has no such numbers and every parser but Python's rejects them."""
    print(json.dumps(finite(obj), indent=None, default=str, allow_nan=False))


def finite(obj):
    """`obj` with every float that is NaN or infinite replaced by None, at any depth."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def emit(a, figures: dict, line: str) -> None:
    """The command's figures as one JSON object with --json, else its line for people."""
    if a.json:
        print_json(figures)
    else:
        print(line)


def finish(p, handler, *, checkpoint: bool | str = False, json: bool | str = False,
           quiet: bool = False, machine: bool = False) -> None:
    """The flags verbs share, each with its help (or the given one), and the function that
    runs the verb: --checkpoint last|best, --json, --quiet, and with `machine` --device and
    --threads (what this machine lends the run: the run itself moves between machines)."""
    if machine:
        p.add_argument("--device", default="auto", type=device_name,
                       help="auto (default: CUDA, then MPS, then the CPU), cpu, cuda, cuda:N or "
                       "mps; the run's own config does not decide it")
        p.add_argument("--threads", type=thread_count, default=None,
                       help="CPU threads for PyTorch (default: its own choice, one per core)")
    if checkpoint:
        p.add_argument("--checkpoint", default="last", choices=["last", "best"],
                       help=checkpoint if isinstance(checkpoint, str) else "which weights: the "
                       "last checkpoint's (default) or the best evaluation's")
    if json:
        p.add_argument("--json", action="store_true", help=json if isinstance(json, str) else
                       "print the figures as one JSON object")
    if quiet:
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=handler)


def unescape(text: str) -> str:
    """\\n, \\t and \\\\ typed on a command line become a newline, a tab and a backslash
    (llama.cpp's --escape), so `--stop "\\n\\n"` means a blank line."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)],
                  text)


def stop_at(a) -> int | None:
    if a.stop_at is not None and a.stop_at <= 0:
        raise MonotileError(f"--stop-at {a.stop_at} is invalid: give a step >= 1")
    return a.stop_at


def check_output(path: str) -> Path:
    """The --output file's Path; an error for a folder or a missing parent folder."""
    target = Path(path)
    if target.is_dir():
        raise MonotileError(f"--output {path} is a folder; give a file name, e.g. preds.csv")
    if not target.parent.exists():
        raise MonotileError(f"--output {path}: folder {target.parent} does not exist")
    return target


def write_rows_csv(path: str, header: list[str], rows: list[list]) -> None:
    """A CSV file written atomically: the header, then the rows."""
    import csv
    import io

    from ..train.checkpoint import atomic_write_text
    target = check_output(path)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_text(target, buf.getvalue())


DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def device_name(value: str) -> str:
    if not DEVICE.fullmatch(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a device: give auto, cpu, cuda, "
                                         "cuda:N or mps")
    return value


def thread_count(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} is not a thread count: give a whole "
                                         "number >= 1")
    return n


def apart(work):
    """work(), run in a child process forked for it, its result (JSON: no code travels, as
    no pickle is read anywhere in monotile) or the error it raised sent back through a pipe:
    the memory the work takes leaves with the child. `monotile generate` encodes its prompt
    so: parsing SmolLM2's tokenizer takes ~30 MB for a moment and keeps ~15, and the C
    allocator kept ~14 MB of it for good even once let go. Where fork is missing (Windows),
    or other Python threads run (a fork copies only this one: a lock one of them held would
    never be released in the child), work() runs here. Native thread pools (numpy's OpenBLAS
    starts one at import) wait idle, and the work runs none of their code: no tensor
    operation, only text."""
    import threading
    if not hasattr(os, "fork") or threading.active_count() != 1:
        return work()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing of the parent's state is shut down or flushed here
        os.close(read)
        try:
            try:
                data = json.dumps({"value": work()})
            except BaseException as e:  # noqa: BLE001  (raised again in the parent)
                data = json.dumps({"error": type(e).__name__, "message": str(e)})
            with os.fdopen(write, "w", encoding="utf-8") as out:
                out.write(data)
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, encoding="utf-8") as src:
        data = src.read()
    _, status = os.waitpid(pid, 0)
    if not data:  # killed before it answered (out of memory, a signal)
        raise MonotileError(f"the child process encoding the prompt ended without an answer "
                            f"(status {status}); run again")
    answer = json.loads(data)
    if "error" in answer:
        raise _error(answer["error"], answer["message"])
    return answer["value"]


def _error(name: str, message: str) -> BaseException:
    """The child's error as the parent raises it: monotile's own and Ctrl-C as they were."""
    from .. import errors
    if name == "KeyboardInterrupt":
        return KeyboardInterrupt()
    kind = getattr(errors, name, None)
    if isinstance(kind, type) and issubclass(kind, MonotileError):
        return kind(message)
    return RuntimeError(f"{name} in the child process: {message}")
