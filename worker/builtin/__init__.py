"""Pretrained starting weights shipped with the package (made by ``flava pretrain``).

``<preset>.pt`` holds fp16 backbone + AVM weights in our learner-state layout (loads with
``torch.load(weights_only=True)``); ``<preset>.json`` is its card: data, steps, seeds, the
AVM's held-out matching accuracy, the file's sha256 and the exact command that made it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

BUILTIN_DIR = Path(__file__).resolve().parent


def builtin_path(preset: str) -> Path | None:
    """The shipped weights for ``preset``, or None when none are shipped."""
    path = BUILTIN_DIR / f"{preset}.pt"
    return path if path.is_file() else None


def builtin_card(preset: str) -> dict[str, Any] | None:
    """The card of the shipped weights for ``preset`` (None when none are shipped)."""
    path = BUILTIN_DIR / f"{preset}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
