"""Long uploads as windows: which example spans an upload is cut into (API and worker).

An example is one aligned span of audio and frames (docs/media.md): 2.56 s at ``tiny``,
5.12 s at ``small``, 10.24 s at ``base``. An upload at most ``span + stride`` long is one
example, placed as for any clip (anywhere in training, centred at eval). A longer one is cut
into windows that start every ``stride`` seconds, the grid centred in the upload; each window
is an example of its own with its own stream entry (docs/media.md, "Long uploads").

Pure Python: the API imports it without torch; ``tests`` check ``SPAN_S`` against the presets.
"""

from __future__ import annotations

from pathlib import Path

PARTIAL_SUFFIX = ".part"  # an upload file still being written (renamed when whole and synced)
# audio_frames x 10 ms of each model preset (worker.core.model.preset(name).media())
SPAN_S = {"tiny": 2.56, "small": 5.12, "base": 10.24}


def span_s(preset: str) -> float:
    """The example span of a preset; a clear error for an unknown one."""
    try:
        return SPAN_S[preset]
    except KeyError:
        raise ValueError(f"unknown preset {preset!r}: one of {', '.join(SPAN_S)}") from None


def window_starts(duration_s: float | None, span: float, stride: float) -> list[float]:
    """Span starts (s from the upload's start) of an upload ``duration_s`` long; [] when it is
    one example (not longer than ``span + stride``, or of unknown length).

    >>> window_starts(10.0, 2.56, 2.56)
    [1.16, 3.72, 6.28]
    """
    if stride <= 0 or span <= 0:
        raise ValueError(f"span ({span}) and stride ({stride}) must be positive")
    if duration_s is None or duration_s <= span + stride:
        return []
    count = int((duration_s - span) // stride) + 1
    offset = (duration_s - span - (count - 1) * stride) / 2  # the tail left over, split
    return [round(offset + i * stride, 3) for i in range(count)]


def upload_path(blob_dir: str | Path, upload_id: str) -> Path:
    """Where an upload cut into windows keeps its bytes: one file per upload, named by its
    sha256, in a directory the API writes and the workers read (a shared volume)."""
    return Path(blob_dir) / upload_id
