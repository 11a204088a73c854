"""Forget-robust patch selection (docs/design.md section 4): plain functions over tensors.

Conventions: B clips, L tokens of one modality, H heads, d head width. Token indices are
(B, K) int64 into the modality's full token sequence; audio tokens are time-major
(index = t * freq_bins + f). Masks are bool, True = "has the property" (candidate, excluded).
All randomness goes through a passed `torch.Generator` (any device; draws are made on the
generator's device and moved to the data's device).

Pipeline for the current clips (`select`):
  candidates = top `ratio` of tokens by importance I;
  C[j] = 1/H sum_h sigmoid(<K^h[j], q_past^h>/sqrt(d) - <K^h[j], q_now^h>/sqrt(d)) on
  candidates, 0 elsewhere, where video keys are compared with the *audio* prototypes
  (paired replay clip's vs. the clip's own) and audio keys with the video prototypes;
  e ~ Bernoulli(C), I~ = I * (1 - e);
  video: sample without replacement proportional to I~, keep the first K_v;
  audio: time-contiguous chunks (see `audio_keep`).
Replay clips (`select_replay`) reuse their stored C and I with fresh Bernoulli draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class SelectionConfig:
    keep_ratio: float = 0.5  # tokens kept per modality (authors: 1 - core ratio = 0.5)
    chunk_time: int = 4  # audio chunk length in token time steps (authors: 4)
    correlation: bool = True  # False = `flava-nocorr` ablation: no exclusion, C = 0


@dataclass
class ClipScores:
    """What the AVM computed for the current clips (see `AVM.clip_scores`)."""

    importance_a: Tensor  # I_a (B, La)
    importance_v: Tensor  # I_v (B, Lv)
    keys_a: Tensor  # K_a (B, H, La, d)
    keys_v: Tensor  # K_v (B, H, Lv, d)
    proto_a: Tensor  # audio query prototype q_hat_a (B, H, d)
    proto_v: Tensor  # video query prototype q_hat_v (B, H, d)
    cand_a: Tensor  # (B, La) bool candidates
    cand_v: Tensor  # (B, Lv) bool candidates


@dataclass
class Selection:
    keep_a: Tensor  # (B, K_a) int64 audio tokens given to the backbone
    keep_v: Tensor  # (B, K_v) int64 video tokens given to the backbone
    C_a: Tensor  # (B, La) correlation scores (0 off-candidate / without a replay partner)
    C_v: Tensor  # (B, Lv)
    I_a: Tensor  # (B, La) importance (not the excluded I~), as stored in memory
    I_v: Tensor  # (B, Lv)
    frac_excluded: Tensor  # scalar: excluded tokens / all tokens of both modalities


def keep_count(length: int, ratio: float) -> int:
    """Number of tokens kept out of `length` (at least 1)."""
    return max(1, int(length * ratio))


def _uniform(shape: tuple[int, ...], like: Tensor, generator: torch.Generator | None) -> Tensor:
    """U[0, 1) draws of `shape` from `generator`, returned on `like`'s device."""
    device = generator.device if generator is not None else like.device
    return torch.rand(shape, generator=generator, device=device).to(like.device)


def candidates(importance: Tensor, ratio: float) -> Tensor:
    """(B, L) bool mask of the top int(L * ratio) tokens by importance (B, L)."""
    k = keep_count(importance.shape[1], ratio)
    top = importance.topk(k, dim=1).indices
    return torch.zeros_like(importance, dtype=torch.bool).scatter_(1, top, True)


def correlation(k: Tensor, proto_past: Tensor, proto_now: Tensor, cand_mask: Tensor) -> Tensor:
    """C (B, L): mean over heads of sigmoid(<K[j], q_past>/sqrt(d) - <K[j], q_now>/sqrt(d)).

    k (B, H, L, d) keys of one modality; proto_past / proto_now (B, H, d) the *other*
    modality's query prototypes (paired replay clip's / the clip's own); zero off-candidate.
    """
    scale = k.shape[-1] ** -0.5
    diff = torch.einsum("bhld,bhd->bhl", k.float(), (proto_past - proto_now).float()) * scale
    return diff.sigmoid().mean(dim=1) * cand_mask.float()


def exclude(C: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """e ~ Bernoulli(C), (B, L) bool; True = excluded from this step's keep-set."""
    return _uniform(tuple(C.shape), C, generator) < C


def weighted_order(
    weights: Tensor, generator: torch.Generator | None = None, fallback: Tensor | None = None
) -> Tensor:
    """(B, L) permutation: sampling without replacement proportional to weights (B, L).

    Gumbel-top-k (sort log w + Gumbel): the same distribution as successive
    `torch.multinomial(weights, L, replacement=False)` draws, but defined when fewer than L
    weights are non-zero (multinomial's documented precondition). Zero-weight tokens come
    last, ordered by `fallback` (descending) and then by index, so the tail is deterministic.
    """
    u = _uniform(tuple(weights.shape), weights, generator).clamp_min(1e-12)
    key = weights.float().log() - (-u.log()).log()  # -inf where weight is 0
    secondary = fallback.float() if fallback is not None else torch.zeros_like(key)
    order = secondary.argsort(dim=1, descending=True, stable=True)
    primary = key.gather(1, order).argsort(dim=1, descending=True, stable=True)
    return order.gather(1, primary)


def video_keep(
    I_tilde: Tensor,
    K: int,
    generator: torch.Generator | None = None,
    fallback: Tensor | None = None,
) -> Tensor:
    """(B, K) distinct indices sampled without replacement proportional to I~ (B, L).

    When fewer than K tokens have non-zero I~, the rest are filled with zero-weight
    (excluded) tokens in order of `fallback` (the un-excluded importance I), then index.
    """
    return weighted_order(I_tilde, generator, fallback)[:, :K]


def topk_keep(importance: Tensor, K: int) -> Tensor:
    """(B, K) indices of the K most important tokens (first step, empty memory)."""
    return importance.topk(K, dim=1).indices


def random_keep(
    batch: int,
    length: int,
    K: int,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """(B, K) uniformly random distinct indices (the `flava-noimp` ablation)."""
    like = torch.empty(0, device=device)
    return _uniform((batch, length), like, generator).argsort(dim=1)[:, :K]


def chunk_grid(time_steps: int, freq_bins: int, chunk_time: int = 4) -> Tensor:
    """(n_chunks, chunk_time * freq_bins) token ids of each audio chunk, time-major.

    Chunk c covers time steps [c*chunk_time, (c+1)*chunk_time) and all freq bins. When
    time_steps is not a multiple of chunk_time the last chunk is shorter; it is padded with -1.
    """
    n_chunks = -(-time_steps // chunk_time)
    size = chunk_time * freq_bins
    ids = torch.arange(n_chunks * size).view(n_chunks, size)
    return ids.masked_fill(ids >= time_steps * freq_bins, -1)


@dataclass
class _Boundary:
    position: Tensor  # (B,) position in chunk order of the chunk that reaches K (n if none)
    keep_tail: Tensor  # (B,) bool: that chunk keeps its last tokens (trimmed at its start)


def _boundary(
    order: Tensor, counts: Tensor, K: int, generator: torch.Generator | None
) -> _Boundary:
    """Find the chunk where the running count of usable tokens reaches K, and its open side.

    order (B, n) chunk ids in sampled order; counts (B, n) usable tokens per chunk id. The
    boundary chunk is trimmed on its open side: the side whose time-neighbour chunk was not
    selected before it, so the kept part stays attached to a selected neighbour. If only the
    previous-time chunk is selected the chunk keeps its head; if only the next-time chunk is,
    its tail; with both or neither selected the side is a fair coin (as in the authors' code).
    """
    b, n = order.shape
    cum = counts.gather(1, order).cumsum(1)
    position = (cum < K).sum(1)
    chunk = order.gather(1, position.clamp_max(n - 1)[:, None]).squeeze(1)
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(n, device=order.device).expand(b, n)
    )
    left = (chunk > 0) & (rank.gather(1, (chunk - 1).clamp_min(0)[:, None]).squeeze(1) < position)
    right_id = (chunk + 1).clamp_max(n - 1)[:, None]
    right = (chunk < n - 1) & (rank.gather(1, right_id).squeeze(1) < position)
    coin = _uniform((b,), order, generator) < 0.5
    keep_tail = (right & ~left) | ((left == right) & coin)
    return _Boundary(position=position, keep_tail=keep_tail)


def audio_keep(
    importance: Tensor,
    excluded: Tensor,
    K: int,
    time_steps: int,
    freq_bins: int,
    chunk_time: int = 4,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(B, K) distinct audio token indices made of time-contiguous chunks.

    importance (B, L) orders the chunks: sampled without replacement proportional to each
    chunk's mean importance (the authors pass the raw I here; exclusion enters only through
    `excluded` (B, L) bool). Non-excluded tokens are taken chunk by chunk, each chunk in
    time-major order, until exactly K; the chunk that crosses K is trimmed on its open side
    (see `_boundary`). Only if fewer than K tokens are non-excluded are excluded ones added,
    in the same chunk order.
    """
    grid = chunk_grid(time_steps, freq_bins, chunk_time).to(importance.device)
    valid = grid >= 0
    ids = grid.clamp_min(0)
    chunk_w = (importance[:, ids] * valid).sum(-1) / valid.sum(-1)  # (B, n) mean importance
    order = weighted_order(chunk_w, generator)
    usable = ~excluded[:, ids] & valid  # (B, n, S)
    edge = _boundary(order, usable.sum(-1), K, generator)
    seq = grid[order]  # (B, n, S) token ids in chunk order
    at_edge = torch.arange(order.shape[1], device=order.device) == edge.position[:, None]
    flip = (at_edge & edge.keep_tail[:, None])[..., None]
    seq = torch.where(flip, seq.flip(-1), seq).flatten(1)
    return _first_usable(seq, excluded, K)


def _first_usable(seq: Tensor, excluded: Tensor, K: int) -> Tensor:
    """First K ids of seq (B, N; -1 = padding): non-excluded first, then excluded, in order."""
    is_pad = seq < 0
    is_excl = excluded.gather(1, seq.clamp_min(0)) & ~is_pad
    tier = is_pad.long() * 2 + is_excl.long()  # 0 usable, 1 excluded, 2 padding
    pos = tier.argsort(dim=1, stable=True)[:, :K]
    return seq.gather(1, pos)


def pair_with_replay(past: Tensor, batch: int) -> Tensor:
    """Partner of current clip n is replay clip n (cycled when fewer replay clips), (B, ...)."""
    idx = torch.arange(batch, device=past.device) % past.shape[0]
    return past[idx]


def select(
    scores: ClipScores,
    past_proto_a: Tensor | None,
    past_proto_v: Tensor | None,
    audio_grid: tuple[int, int],
    cfg: SelectionConfig,
    generator: torch.Generator | None = None,
) -> Selection:
    """Keep-sets for the current clips, plus the C and I to store with them.

    past_proto_a / past_proto_v (R, H, d): stored prototypes of the replay clips paired with
    the current ones, or None when memory is empty (then plain top-K, C = 0).
    audio_grid = (time_steps, freq_bins) of the audio token map.
    """
    i_a, i_v = scores.importance_a, scores.importance_v
    if past_proto_a is None or past_proto_v is None:
        return _first_step(i_a, i_v, cfg)
    c_a, c_v = torch.zeros_like(i_a), torch.zeros_like(i_v)
    if cfg.correlation:
        b = i_a.shape[0]
        past_a, past_v = pair_with_replay(past_proto_a, b), pair_with_replay(past_proto_v, b)
        c_v = correlation(scores.keys_v, past_a, scores.proto_a, scores.cand_v)
        c_a = correlation(scores.keys_a, past_v, scores.proto_v, scores.cand_a)
    return select_replay(c_a, c_v, i_a, i_v, audio_grid, cfg, generator)


def select_replay(
    C_a: Tensor,
    C_v: Tensor,
    I_a: Tensor,
    I_v: Tensor,
    audio_grid: tuple[int, int],
    cfg: SelectionConfig,
    generator: torch.Generator | None = None,
) -> Selection:
    """Keep-sets from given (stored) C and I with fresh Bernoulli exclusion draws."""
    e_a, e_v = exclude(C_a, generator), exclude(C_v, generator)
    k_a = keep_count(I_a.shape[1], cfg.keep_ratio)
    k_v = keep_count(I_v.shape[1], cfg.keep_ratio)
    keep_v = video_keep(I_v * ~e_v, k_v, generator, fallback=I_v)
    time_steps, freq_bins = audio_grid
    keep_a = audio_keep(I_a, e_a, k_a, time_steps, freq_bins, cfg.chunk_time, generator)
    n_excl = e_a.sum() + e_v.sum()
    frac = n_excl.float() / (e_a.numel() + e_v.numel())
    return Selection(keep_a, keep_v, C_a, C_v, I_a, I_v, frac_excluded=frac)


def _first_step(I_a: Tensor, I_v: Tensor, cfg: SelectionConfig) -> Selection:
    """Empty memory: plain top-K per modality, nothing excluded (C = 0)."""
    keep_a = topk_keep(I_a, keep_count(I_a.shape[1], cfg.keep_ratio))
    keep_v = topk_keep(I_v, keep_count(I_v.shape[1], cfg.keep_ratio))
    zero = I_a.new_zeros(())
    return Selection(
        keep_a, keep_v, torch.zeros_like(I_a), torch.zeros_like(I_v), I_a, I_v, frac_excluded=zero
    )


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """tokens (B, L, P) at ids (B, K) -> (B, K, P)."""
    return tokens.gather(1, ids[..., None].expand(-1, -1, tokens.shape[-1]))
