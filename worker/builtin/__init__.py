"""Pretrained starting weights shipped with the package (made by ``flava pretrain``).

``<preset>.pt`` holds fp16 backbone + AVM weights in our learner-state layout (loads with
``torch.load(weights_only=True)``); ``<preset>.json`` is its card: data, steps, seeds, the
AVM's held-out matching accuracy, the file's sha256 and the exact command that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
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


def resolve_init_weights(value: str | None, preset: str) -> Path | None:
    """``FLAVA_INIT_WEIGHTS`` -> the file a cold worker starts from (None: from scratch).

    ``builtin`` (the default) is the shipped file of ``preset``, or None with a warning when
    none is shipped for it; ``none`` (or empty) is None; anything else is a path that must
    exist.
    """
    if value is None or value.strip().lower() in ("", "none"):
        return None
    if value.strip().lower() == "builtin":
        path = builtin_path(preset)
        if path is None:
            log.warning("no builtin weights for preset %r: starting from scratch", preset)
        return path
    path = Path(value).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"FLAVA_INIT_WEIGHTS={value!r}: no such file")
    return path
