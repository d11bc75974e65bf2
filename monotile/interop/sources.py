"""Where a model comes from: a run directory, a Hugging Face folder, a GGUF file, a CTranslate2
folder, or a name on the Hugging Face hub, each made a run directory once.

    run directory        runs/shakespeare-char           used as it is
    Hugging Face folder  ./SmolLM2 (config.json, ...)    imported
    GGUF file            model.Q4_K_M.gguf               imported (llama.cpp, ollama, LM Studio)
    CTranslate2 folder   ./whisper-tiny.en (model.bin)   imported (faster-whisper's Whisper)
    hub name             HuggingFaceTB/SmolLM2-135M-Instruct[@revision]
                                                         downloaded (huggingface_hub's cache and
                                                         progress bars), then imported

`generate`, `chat` and `serve` take any of these. What is not a run directory is imported once
into the cache ($XDG_CACHE_HOME/monotile/runs, ~/.cache by default), keyed by where it came
from (the file's path, size and time, or each file's of a folder; the hub revision's commit),
and reused after.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
from pathlib import Path

from ..data import cache_dir
from ..errors import CheckpointError, ConfigError

HUB_NAME = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
# what import needs of a hub repository: weights in safetensors, configs, tokenizers, templates
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "vocab.txt", "*.model", "*.txt"]


def is_hub_name(spec: str) -> bool:
    """ORG/NAME (optionally @REVISION) that is not a path on this machine."""
    return bool(HUB_NAME.match(str(spec))) and not Path(spec).expanduser().exists()


def split_revision(spec: str) -> tuple[str, str | None]:
    name, _, revision = str(spec).partition("@")
    return name, revision or None


def hub_folder(name: str, revision: str | None = None) -> Path:
    """The local folder of a hub repository at `revision` in huggingface_hub's cache: checked
    against the hub for a newer commit and completed when online (as transformers'
    from_pretrained does), the cached snapshot alone when offline or $HF_HUB_OFFLINE=1."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise ConfigError(f"{name} is a hub name, and reading the hub needs huggingface_hub: "
                          "pip install 'monotile[hub]'") from None
    try:
        return Path(snapshot_download(name, revision=revision, allow_patterns=HUB_FILES))
    except RevisionNotFoundError:
        raise ConfigError(f"{name} has no revision {revision!r}; give a branch, tag or "
                          "commit of the repository") from None
    except GatedRepoError:
        raise ConfigError(f"{name} is gated: accept its terms on huggingface.co and log in "
                          "(huggingface-cli login), then try again") from None
    except RepositoryNotFoundError:
        raise ConfigError(f"{name} is not a model on the Hugging Face hub (or it is private: "
                          "log in with huggingface-cli login); check the name") from None
    except LocalEntryNotFoundError:
        raise ConfigError(f"{name} is not in the local hub cache and the hub cannot be reached "
                          "(offline, or HF_HUB_OFFLINE=1); connect once to download it, or give "
                          "a local folder or GGUF file") from None
    except OSError as e:  # a network failure part way, a full disk
        raise ConfigError(f"{name} could not be downloaded ({e}); try again, or give a local "
                          "folder or GGUF file") from None


def imported_runs() -> Path:
    return cache_dir() / "runs"


def run_dir_for(spec: str | Path, *, revision: str | None = None) -> Path:
    """A run directory for `spec`: itself when it is one, else the cached import of the
    folder, file or hub name it names (imported now if it is not cached yet)."""
    path = Path(str(spec)).expanduser()
    if (path / "config.json").is_file() and _is_run(path):
        return path
    if path.is_dir() and not any((path / f).is_file() for f in ("config.json", "model.bin")):
        raise CheckpointError(f"{path} is not a monotile run (no config.json) nor a model "
                              "folder; give a run made by `monotile train`, a Hugging Face or "
                              "CTranslate2 folder, a GGUF file or a hub name ORG/NAME")
    if path.exists():
        key = ":".join([str(path.resolve())] + [  # a folder by its files: one edited in place
            f"{f.name}:{s.st_size}:{s.st_mtime_ns}"   # leaves the folder's own time alone
            for f in sorted([path] if path.is_file() else path.iterdir())
            for s in [f.stat()]])
        return _cached(path.name.removesuffix(".gguf"), key, lambda out: import_any(path, out))
    if is_hub_name(str(spec)):
        name, at = split_revision(str(spec))
        folder = hub_folder(name, revision or at)
        key = f"hub:{name}:{folder.name}"  # the snapshot folder is named by its commit
        return _cached(name.replace("/", "--"), key, lambda out: import_any(folder, out))
    raise CheckpointError(f"{spec} is not a run directory, a model folder, a GGUF file, a "
                          "CTranslate2 folder or a hub name (ORG/NAME); check the path")


def import_any(src: Path, out: str | Path | None) -> Path:
    """A run directory at `out` from a Hugging Face folder, a GGUF file or a CTranslate2
    folder (model.bin), by what it is."""
    src = Path(src)
    from .gguf import is_gguf
    if is_gguf(src):
        from .gguf import import_gguf
        return import_gguf(src, out)
    if src.is_dir() and (src / "model.bin").is_file():
        from .ct2 import import_ct2
        return import_ct2(src, out)
    if src.is_dir():
        from .hf import import_hf
        return import_hf(src, out)
    raise CheckpointError(f"{src} is neither a Hugging Face model folder (config.json, "
                          "model.safetensors), a CTranslate2 folder (model.bin) nor a GGUF "
                          "file; check the path")


def _is_run(path: Path) -> bool:
    """A monotile run's config.json names its task; a Hugging Face one names a model_type. One
    that cannot be read is taken for a run's, so that loading it says what is wrong with it."""
    import json
    try:
        return "task" in json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True


def _cached(name: str, key: str, make) -> Path:
    """The cache's run for `key`, made by make(folder) into a temporary folder first and
    renamed into place, so two processes importing at once leave one whole run."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    slug = re.sub(r"[^\w.-]+", "-", name)[:80] + "-" + digest
    target = imported_runs() / slug
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{slug}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        make(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process put it there first: keep theirs
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
