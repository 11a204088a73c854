"""Localized scenes (worker/core/localized.py) as a ClipSet, through real MP4 bytes.

Each scene is rendered, encoded to MP4, decoded with ``decode_clip`` exactly as the worker
decodes an upload (eval mode: the centred aligned window), and kept with its ground-truth
token masks. One function per scene (``scene_tensors``), used by ``flava pretrain`` and the
continual benchmark alike.
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing

import torch
from torch import Tensor

from worker.core.clipset import ClipSet, build_clipset, uint8_frames
from worker.core.localized import (
    LOCALIZED_SHAPES,
    LocalizedConfig,
    SceneSpec,
    make_scene_clip,
    scene_masks,
    scene_objects,
)
from worker.core.media import MediaConfig, decode_clip


def scene_tensors(
    spec: SceneSpec, cfg: LocalizedConfig, media: MediaConfig, patch: int
) -> dict[str, Tensor]:
    """The ClipSet fields of one scene; its label is the sounding object's shape."""
    clip = decode_clip(make_scene_clip(spec, cfg), media)
    masks = scene_masks(spec, cfg, media, patch)
    shape = scene_objects(spec, cfg)[0].shape
    return {
        "fbank": clip.fbank,
        "frames": uint8_frames(clip),
        "labels": torch.tensor(LOCALIZED_SHAPES.index(shape)),
        "objects": masks.object_v,
        "distractors": masks.distractor_v & ~masks.object_v,
        "objects_a": masks.object_a,
    }


def scene_set(
    specs: list[SceneSpec],
    cfg: LocalizedConfig,
    media: MediaConfig,
    patch: int,
    workers: int = 1,
) -> ClipSet:
    """The scenes as one ClipSet, decoded in ``workers`` spawned processes."""
    extra = (cfg, media, patch)
    if workers <= 1:
        return build_clipset(scene_tensors, specs, extra)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        return build_clipset(scene_tensors, specs, extra, pool)
