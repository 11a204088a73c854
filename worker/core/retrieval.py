"""Zero-shot audio<->video retrieval recall (R@K), as in CAV-MAE and STELLA.

Embeddings are L2-normalised and compared by cosine similarity. Query i's true match is
item i of the other modality; with ``labels`` any item sharing query i's label counts.
Ties in similarity are broken by ``torch.topk`` (lower index first in practice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_CHUNK = 1024  # query rows per similarity block, bounds memory at N x 1024


def _hits_at_k(queries: Tensor, items: Tensor, labels: Tensor, k_max: int) -> Tensor:
    """(N, k_max) bool: whether the j-th best item of each query matches its label."""
    out = []
    for start in range(0, queries.shape[0], _CHUNK):
        sim = queries[start : start + _CHUNK] @ items.t()  # (chunk, N) cosine similarities
        top = sim.topk(k_max, dim=1).indices
        out.append(labels[top] == labels[start : start + _CHUNK, None])
    return torch.cat(out)


def _recalls(hits: Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """R@k in percent for each k, plus "avg" over them."""
    res = {f"r{k}": 100.0 * hits[:, :k].any(dim=1).double().mean().item() for k in ks}
    res["avg"] = sum(res.values()) / len(ks)
    return res


def recall_at_k(
    a: Tensor,
    v: Tensor,
    ks: tuple[int, ...] = (1, 5, 10),
    labels: Tensor | None = None,
) -> dict[str, dict[str, float]]:
    """Audio->video and video->audio recall in percent.

    a (N, D) audio and v (N, D) video embeddings of the same N clips (row i is a pair);
    labels (N,) ints, optional. k larger than N counts as N. Returns
    ``{"a2v": {"r1", "r5", "r10", "avg"}, "v2a": {...}}`` (keys follow ``ks``), where
    "avg" is the mean of the R@k values.
    """
    if a.shape != v.shape or a.dim() != 2:
        raise ValueError(f"need a and v of the same (N, D) shape, got {a.shape} and {v.shape}")
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    n = a.shape[0]
    lab = torch.arange(n) if labels is None else labels.reshape(-1).cpu()
    if lab.shape[0] != n:
        raise ValueError(f"labels has {lab.shape[0]} entries for {n} clips")
    a_n = F.normalize(a.detach().float().cpu(), dim=-1)
    v_n = F.normalize(v.detach().float().cpu(), dim=-1)
    k_max = min(max(ks), n)
    return {
        "a2v": _recalls(_hits_at_k(a_n, v_n, lab, k_max), ks),
        "v2a": _recalls(_hits_at_k(v_n, a_n, lab, k_max), ks),
    }


def recall_against(
    queries: Tensor, gallery: Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[str, float]:
    """Recall in percent of queries (N, D) against a gallery (N, D) of the same N clips.

    Query i's one match is gallery row i; the two sides may come from different models
    (cross-version retrieval: queries by one version, the gallery by an earlier one) or
    modalities. Returns ``{"r1", ..., "avg"}`` as one direction of ``recall_at_k``.
    """
    if queries.shape != gallery.shape or queries.dim() != 2:
        raise ValueError(
            f"need two (N, D) sides of one shape, got {queries.shape}, {gallery.shape}"
        )
    if not ks or min(ks) < 1:
        raise ValueError(f"ks must be positive, got {ks}")
    n = queries.shape[0]
    q = F.normalize(queries.detach().float().cpu(), dim=-1)
    g = F.normalize(gallery.detach().float().cpu(), dim=-1)
    return _recalls(_hits_at_k(q, g, torch.arange(n), min(max(ks), n)), ks)


def recall_by_group(
    a: Tensor, v: Tensor, groups: Tensor, ks: tuple[int, ...] = (1, 5, 10)
) -> dict[int, dict[str, dict[str, float]]]:
    """Instance-level recall of each group's queries against the gallery of all N clips.

    The paper's protocol: a query's own pair is the one correct item among the union of
    every group's (task's) held-out clips; chance R@k = k / N. groups (N,) ints. Returns
    ``{group: {"a2v": {...}, "v2a": {...}}}`` as ``recall_at_k``.
    """
    if a.shape != v.shape or a.dim() != 2 or groups.shape != (a.shape[0],):
        raise ValueError(
            f"need a, v (N, D) and groups (N,), got {a.shape} {v.shape} {groups.shape}"
        )
    n = a.shape[0]
    a_n = F.normalize(a.detach().float().cpu(), dim=-1)
    v_n = F.normalize(v.detach().float().cpu(), dim=-1)
    own, k_max, groups = torch.arange(n), min(max(ks), n), groups.cpu()
    hits = {"a2v": _hits_at_k(a_n, v_n, own, k_max), "v2a": _hits_at_k(v_n, a_n, own, k_max)}
    return {
        int(g): {d: _recalls(h[groups == g], ks) for d, h in hits.items()}
        for g in groups.unique().tolist()
    }
