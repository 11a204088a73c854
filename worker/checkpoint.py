"""Atomic, safely loadable checkpoints: temp file, fsync, rename; ``weights_only`` loads.

A checkpoint is a plain nested dict of tensors, numbers, strings and lists, which is what
``torch.load(weights_only=True)`` accepts, so a tampered file cannot run code on load.
Files are named ``ckpt-{version:010d}.pt``: immutable snapshots, newest = highest version.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from pathlib import Path

import torch

log = logging.getLogger(__name__)
NAME = re.compile(r"^ckpt-(\d{10})\.pt$")


def save_checkpoint(directory: str | Path, version: int, state: dict, keep: int = 3) -> Path:
    """Write ``state`` as the snapshot of ``version``; keep the newest ``keep`` snapshots."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"ckpt-{version:010d}.pt"
    fd, tmp = tempfile.mkstemp(prefix=".ckpt-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(directory)
    _prune(directory, keep)
    log.info("checkpoint v%d written to %s", version, path)
    return path


def latest_checkpoint(directory: str | Path) -> Path | None:
    snapshots = list_checkpoints(directory)
    return snapshots[-1] if snapshots else None


def list_checkpoints(directory: str | Path) -> list[Path]:
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if NAME.match(p.name))


def load_checkpoint(path: str | Path) -> dict:
    """Load with ``weights_only=True``: tensors and plain containers only."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(directory: Path, keep: int) -> None:
    for old in list_checkpoints(directory)[:-keep] if keep > 0 else []:
        old.unlink(missing_ok=True)
