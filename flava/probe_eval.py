"""What the stream bought: the learned model against the frozen start, on held-out probes.

Both models embed the same probe clips (decoded from the bytes that were posted, exactly as
the worker decodes them) and are scored with the paper's protocol: instance-level hits (a
query's own pair is the one correct item) against the gallery of every segment's probes
(chance R@1 = 1 / gallery size).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from worker.core.clipset import ClipSet, embed_clips, uint8_frames
from worker.core.learner import Learner, LearnerConfig, build_learner
from worker.core.media import decode_clip
from worker.core.model import preset as model_preset
from worker.core.pretrain import avm_matching_accuracy
from worker.core.retrieval import recall_by_group


@dataclass
class ProbeSet:
    clips: ClipSet  # decoded probes (labels = segment index)
    names: list[str]  # segment names, by index


def decode_probes(probes: list[tuple[int, bytes]], names: list[str], preset: str) -> ProbeSet:
    """(segment index, MP4 bytes) pairs -> decoded probes."""
    media = model_preset(preset).media()
    fbank, frames = [], []
    for _, data in probes:
        clip = decode_clip(data, media)
        fbank.append(clip.fbank)
        frames.append(uint8_frames(clip))
    labels = torch.tensor([seg for seg, _ in probes], dtype=torch.int64)
    none = torch.zeros(len(probes), 1, dtype=torch.bool)
    return ProbeSet(ClipSet(torch.stack(fbank), torch.stack(frames), labels, none), names)


def learner_from_checkpoint(path: Path, method: str, preset: str) -> Learner:
    """The worker's model as its checkpoint holds it."""
    from worker.checkpoint import load_checkpoint

    learner = build_learner(method, model_preset(preset), LearnerConfig(memory_size=1))
    state = load_checkpoint(path)["learner"]
    learner.model.load_state_dict(state["model"])
    learner.extra_modules.load_state_dict(state["extra_modules"])
    return learner


def learner_from_weights(path: Path, method: str, preset: str) -> Learner:
    """A fresh learner warm-started from ``path`` (the frozen start)."""
    from worker.warmstart import warm_start

    learner = build_learner(method, model_preset(preset), LearnerConfig(memory_size=1))
    warm_start(learner, path)
    return learner


def segment_r1(learner: Learner, probes: ProbeSet) -> dict[str, dict[str, float]]:
    """{segment: {"r1_a2v", "r1_v2a"}} in %, instance-level over the union of all probes."""
    a, v = embed_clips(learner, probes.clips)
    res = recall_by_group(a, v, probes.clips.labels, ks=(1,))
    return {
        probes.names[g]: {"r1_a2v": r["a2v"]["r1"], "r1_v2a": r["v2a"]["r1"]}
        for g, r in res.items()
    }


def avm_accuracy(learner: Learner, probes: ProbeSet) -> float | None:
    """The learner's AVM matching accuracy on the probes (None for methods without one)."""
    if "avm" not in learner.extra_modules:
        return None
    return avm_matching_accuracy(learner.model, learner.extra_modules["avm"], probes.clips)
