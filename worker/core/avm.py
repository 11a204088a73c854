"""Localized audio-video alignment: the AVM (audio-video matching module) and patch importance.

A small cross-modal attention module over the frozen backbone's code-pass tokens
z_a (B, La, D) and z_v (B, Lv, D). Shapes used throughout:

    B batch, H heads, d head width, La / Lv audio / video tokens,
    projections q, k, v: (B, H, L, d),
    S_av = Q_a K_v^T / sqrt(d): (B, H, La, Lv)   (audio queries attend video keys),
    S_va = Q_v K_a^T / sqrt(d): (B, H, Lv, La).

It serves two purposes (docs/design.md section 3):
- trained every step with a binary matching loss (true pair vs. deranged video), on detached
  backbone tokens so only the AVM learns from it;
- without gradients, it scores every token: I_v[j] = 1/(H La) sum_h sum_i softmax_j(S_av/tau),
  I_a symmetric from S_va. Each importance vector sums to 1 per clip.

Parameter names follow the authors' `CrossModalAttention` so their pretrained weights load with
`map_author_keys`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.core.selection import ClipScores, candidates


@dataclass
class AVMConfig:
    dim: int = 768  # width D of the backbone tokens the AVM reads
    heads: int = 12  # H cross-modal attention heads
    head_dim: int = 64  # d; the authors use dim // heads
    tau: float = 0.4  # softmax temperature of the importance scores
    candidate_ratio: float = 0.5  # fraction of tokens that are selection candidates

    @property
    def inner(self) -> int:
        """Width H*d of the concatenated heads."""
        return self.heads * self.head_dim


@dataclass
class QKV:
    """One modality's projections, each (B, H, L, d)."""

    q: Tensor
    k: Tensor
    v: Tensor

    def index(self, idx: Tensor) -> QKV:
        """Reorder/select clips along the batch dimension."""
        return QKV(self.q[idx], self.k[idx], self.v[idx])

    def detach(self) -> QKV:
        return QKV(self.q.detach(), self.k.detach(), self.v.detach())


@dataclass
class AVMProjections:
    a: QKV  # audio
    v: QKV  # video


@dataclass
class AVMLogits:
    av: Tensor  # S_av (B, H, La, Lv)
    va: Tensor  # S_va (B, H, Lv, La)


@dataclass
class Importance:
    a: Tensor  # I_a (B, La), sums to 1 per clip
    v: Tensor  # I_v (B, Lv), sums to 1 per clip


@dataclass
class MatchingResult:
    loss: Tensor  # scalar BCE-with-logits
    acc: Tensor  # scalar fraction of correct match decisions (logit > 0 <=> match)
    logits: Tensor  # (B,) matching logits
    labels: Tensor  # (B,) 1 = true pair, 0 = deranged video


def derangement(n: int, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random permutation of range(n) with no fixed point, (n,) int64.

    Rejection sampling (as the authors do): about e tries on average. n must be at least 2.
    """
    if n < 2:
        raise ValueError(f"a derangement needs n >= 2, got {n}")
    device = generator.device if generator is not None else None
    identity = torch.arange(n, device=device)
    while True:
        perm = torch.randperm(n, generator=generator, device=device)
        if not bool((perm == identity).any()):
            return perm.cpu()


def matching_pairs(batch: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Labels (B,) float and video index (B,) int64 for the matching loss.

    A random half (B // 2) keeps its own video (label 1); the rest (at least 2 clips) get a
    derangement of their videos (label 0). Batches under 3 clips are all positive, since one
    negative cannot be deranged (the authors do the same for batches of 1 or 2).
    """
    labels = torch.ones(batch)
    video_index = torch.arange(batch)
    n_neg = batch - batch // 2
    if batch < 3:
        return labels, video_index
    device = generator.device if generator is not None else None
    neg = torch.randperm(batch, generator=generator, device=device)[:n_neg].cpu()
    labels[neg] = 0.0
    video_index[neg] = neg[derangement(n_neg, generator)]
    return labels, video_index


class AVM(nn.Module):
    """Cross-modal attention + matching head over code-pass tokens (see module docstring)."""

    def __init__(self, cfg: AVMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.scale = cfg.head_dim**-0.5
        self.norm_a = nn.LayerNorm(cfg.dim)
        self.norm_v = nn.LayerNorm(cfg.dim)
        self.to_a_q, self.to_a_k, self.to_a_v = (self._linear() for _ in range(3))
        self.to_v_q, self.to_v_k, self.to_v_v = (self._linear() for _ in range(3))
        width = 2 * cfg.inner
        self.head = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
        self.apply(_init_weights)

    def _linear(self) -> nn.Linear:
        """A bias-free projection D -> H*d."""
        return nn.Linear(self.cfg.dim, self.cfg.inner, bias=False)

    def _heads(self, x: Tensor, proj: nn.Module) -> Tensor:
        """(B, L, D) -> (B, H, L, d)."""
        b, n, _ = x.shape
        return proj(x).view(b, n, self.cfg.heads, self.cfg.head_dim).transpose(1, 2)

    def project(self, za: Tensor, zv: Tensor) -> AVMProjections:
        """Normalise each modality and project it to per-head q, k, v (B, H, L, d)."""
        xa, xv = self.norm_a(za), self.norm_v(zv)
        a = QKV(*(self._heads(xa, p) for p in (self.to_a_q, self.to_a_k, self.to_a_v)))
        v = QKV(*(self._heads(xv, p) for p in (self.to_v_q, self.to_v_k, self.to_v_v)))
        return AVMProjections(a=a, v=v)

    def logits(self, proj: AVMProjections) -> AVMLogits:
        """Scaled cross-modal attention logits S_av (B,H,La,Lv) and S_va (B,H,Lv,La)."""
        av = proj.a.q @ proj.v.k.transpose(-2, -1) * self.scale
        va = proj.v.q @ proj.a.k.transpose(-2, -1) * self.scale
        return AVMLogits(av=av, va=va)

    def match_logit(self, a: QKV, v: QKV) -> Tensor:
        """Matching logit (B,) = head([mean_j softmax(S_va) V_a ; mean_i softmax(S_av) V_v])."""
        # fused attention: the (B, H, La, Lv) maps are never stored for the backward pass
        attend = F.scaled_dot_product_attention
        video_side = attend(v.q, a.k, a.v, scale=self.scale).mean(dim=2)  # (B, H, d) over Lv
        audio_side = attend(a.q, v.k, v.v, scale=self.scale).mean(dim=2)  # (B, H, d) over La
        pooled = torch.cat([video_side.flatten(1), audio_side.flatten(1)], dim=1)
        return self.head(pooled).squeeze(-1)

    def matching_loss(
        self, za: Tensor, zv: Tensor, generator: torch.Generator | None = None
    ) -> MatchingResult:
        """BCE matching loss on half true pairs, half deranged videos (see `matching_pairs`).

        For tokens that do not depend on their pair. When the code pass mixes the pair (the
        backbone's joint fusion blocks), run it on the deranged pairs and call `match`.
        The caller passes detached backbone tokens, so only AVM parameters get gradients.
        """
        labels, video_index = matching_pairs(za.shape[0], generator)
        return self.match(za, zv[video_index.to(zv.device)], labels)

    def match(self, za: Tensor, zv: Tensor, labels: Tensor) -> MatchingResult:
        """BCE-with-logits and accuracy for given pairs za (B,La,D), zv (B,Lv,D), labels (B,)."""
        labels = labels.to(device=za.device, dtype=torch.float32)
        proj = self.project(za, zv)
        logits = self.match_logit(proj.a, proj.v).float()
        loss = F.binary_cross_entropy_with_logits(logits, labels)
        acc = ((logits > 0).float() == labels).float().mean()
        return MatchingResult(loss=loss, acc=acc, logits=logits, labels=labels)

    def importance(self, proj: AVMProjections) -> Importance:
        """Token importance I_a (B, La), I_v (B, Lv); each sums to 1 per clip."""
        lg = self.logits(proj)
        tau = self.cfg.tau
        i_v = (lg.av.float() / tau).softmax(-1).mean(dim=(1, 2))  # over heads and audio rows
        i_a = (lg.va.float() / tau).softmax(-1).mean(dim=(1, 2))  # over heads and video rows
        return Importance(a=i_a, v=i_v)

    @staticmethod
    def prototypes(q: Tensor, importance: Tensor, candidates: Tensor) -> Tensor:
        """Importance-weighted query prototype over the candidates, (B, H, d).

        q_hat^h = sum_{j in T} I[j] Q^h[j] / sum_{j in T} I[j]; q (B,H,L,d), importance (B,L),
        candidates (B,L) bool.
        """
        w = importance * candidates.to(importance.dtype)
        total = w.sum(-1).clamp_min(torch.finfo(w.dtype).tiny)
        return torch.einsum("bhld,bl->bhd", q.to(w.dtype), w) / total[:, None, None]

    def clip_scores(self, za: Tensor, zv: Tensor) -> ClipScores:
        """Everything selection needs about the current clips (run under no_grad)."""
        proj = self.project(za, zv)
        imp = self.importance(proj)
        cand_a = candidates(imp.a, self.cfg.candidate_ratio)
        cand_v = candidates(imp.v, self.cfg.candidate_ratio)
        return ClipScores(
            importance_a=imp.a,
            importance_v=imp.v,
            keys_a=proj.a.k,
            keys_v=proj.v.k,
            proto_a=self.prototypes(proj.a.q, imp.a, cand_a),
            proto_v=self.prototypes(proj.v.q, imp.v, cand_v),
            cand_a=cand_a,
            cand_v=cand_v,
        )


def _init_weights(m: nn.Module) -> None:
    """Authors' init: Linear weights N(0, 0.02), zero biases; LayerNorm (1, 0)."""
    if isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


_AUTHOR_HEAD = {"matching_score.pooler.dense.": "head.0.", "matching_score.fc.": "head.2."}


def map_author_keys(state_dict: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Map the authors' `CrossModalAttention` state dict onto `AVM` names.

    `prefix` is stripped first (their checkpoints store `module.avmatching_module.`). Note: the
    authors pool the matching head's input after a reshape that mixes heads and tokens, while
    we mean-pool tokens per head; q/k/v/LN (hence importance and selection) load exactly, the
    matching head should be fine-tuned briefly.
    """
    out = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix) :]
        for old, new in _AUTHOR_HEAD.items():
            key = key.replace(old, new) if key.startswith(old) else key
        out[key] = value
    return out
