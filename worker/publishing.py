"""Publishing a batch's embeddings, stamped with the version that made them.

Embeddings are written at once (state ``embedded``), before the update is durable: a
client may read them right away, and ``model_version`` names the weights exactly
(docs/versions.md). The entries stay pending until a checkpoint holds the update
(worker/checkpointing.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from contract import wire
from worker.queue import Delivery


@dataclass(frozen=True)
class Stamp:
    """The weights that made a batch's embeddings."""

    version: str  # "G.N"
    step: int


def final_state(d: Delivery) -> str:
    """The state a published clip gets once its update is durable."""
    return "learned" if d.entry.purpose == "train" else "probed"


def embeddings_for(
    deliveries: list[Delivery], emb_a: torch.Tensor, emb_v: torch.Tensor, stamp: Stamp, method: str
) -> tuple[list[tuple[Delivery, wire.Embedding]], list[Delivery]]:
    """Wire embeddings for the finite rows of (B, D) ``emb_a``/``emb_v``; the rest set aside."""
    finite = torch.isfinite(emb_a).all(dim=1) & torch.isfinite(emb_v).all(dim=1)
    now = time.time()
    items, non_finite = [], []
    for i, d in enumerate(deliveries):
        if not finite[i]:
            non_finite.append(d)
            continue
        emb = wire.Embedding(
            audio=emb_a[i].float().cpu().tolist(),
            video=emb_v[i].float().cpu().tolist(),
            model_version=stamp.version,
            step=stamp.step,
            method=method,
            written_at=now,
        )
        items.append((d, emb))
    return items, non_finite
