"""Localized scenes (worker/core/localized.py) as a ClipSet, through real MP4 bytes.

Each scene is rendered, encoded to MP4, decoded with ``decode_clip`` exactly as the worker
decodes an upload (eval mode: the centred aligned window), and kept with its ground-truth
token masks. Decoding runs in ``workers`` spawned processes (torch on one thread each).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing

import torch
from torch import Tensor

from worker.core.clipset import ClipSet, uint8_frames
from worker.core.localized import LocalizedConfig, SceneSpec, make_scene_clip, scene_masks
from worker.core.media import MediaConfig, decode_clip

_Job = tuple[list[SceneSpec], LocalizedConfig, MediaConfig, int]


def scene_tensors(
    spec: SceneSpec, cfg: LocalizedConfig, media: MediaConfig, patch: int
) -> tuple[Tensor, ...]:
    """fbank, uint8 frames, object_v, distractor_v, object_a of one scene."""
    clip = decode_clip(make_scene_clip(spec, cfg), media)
    masks = scene_masks(spec, cfg, media, patch)
    return clip.fbank, uint8_frames(clip), masks.object_v, masks.distractor_v, masks.object_a


def _chunk(job: _Job) -> list[tuple[Tensor, ...]]:
    torch.set_num_threads(1)
    specs, cfg, media, patch = job
    return [scene_tensors(s, cfg, media, patch) for s in specs]


def scene_set(
    specs: list[SceneSpec],
    cfg: LocalizedConfig,
    media: MediaConfig,
    patch: int,
    workers: int = 1,
) -> ClipSet:
    """The scenes as one ClipSet (labels = task, -1 for pretraining scenes)."""
    jobs = [(specs[i : i + 16], cfg, media, patch) for i in range(0, len(specs), 16)]
    if workers > 1:
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            parts = list(pool.map(_chunk, jobs))
    else:
        parts = [_chunk(j) for j in jobs]
    rows = [row for part in parts for row in part]
    fbank, frames, obj_v, dis_v, obj_a = (torch.stack(x) for x in zip(*rows, strict=True))
    labels = torch.tensor([s.task for s in specs], dtype=torch.int64)
    return ClipSet(fbank, frames, labels, obj_v, distractors=dis_v, objects_a=obj_a)
