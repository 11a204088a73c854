"""CAV-style audio-video masked autoencoder (the STELLA/FLAVA backbone).

Shapes and conventions (used by every stage below):

- ``fbank``  (B, audio_frames, mel_bins) log-mel filterbank, time first.
- ``frames`` (B, num_frames, 3, frame_size, frame_size) normalised RGB frames.
- Audio tokens are 16x16 patches of the (time x freq) map, time-major:
  index = t * F' + f with F' = mel_bins / 16, so La = (audio_frames / 16) * F'.
- Video tokens are each frame's 16x16 patches, frame-major then row-major:
  index = t * G^2 + row * G + col with G = frame_size / 16, so Lv = num_frames * G^2.
- Token index tensors ``idx`` are (B, K) int64 into a modality's full token sequence.
  ``vis_*`` are the tokens the encoder sees, ``tgt_*`` the tokens the decoder
  reconstructs; a token in neither appears nowhere (FLAVA's memory saving). In mask
  terms (CAV-MAE's "mask: 1 is removed, 0 is kept"), vis are the 0s and tgt the 1s.

Stages: ``tokenize`` (patch embed + position + modality embedding) ->
``forward_modality`` (modality-specific blocks, then the second "fusion" positional
embedding) -> the fusion blocks used three ways (``forward_joint``,
``forward_unimodal``, ``forward_code``) -> ``forward_decoder`` -> losses.
Parameter names follow CAV-MAE / the STELLA code so their checkpoints map onto ours
(worker/core/convert.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from worker.core.media import MediaConfig

# ---------------------------------------------------------------------------------------
# sin-cos positional tables


def sincos_1d(dim: int, pos: Tensor) -> Tensor:
    """(M,) positions -> (M, dim) table, first half sin, second half cos (as MAE)."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.double().reshape(-1, 1) * omega.reshape(1, -1)  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1).float()


def sincos_2d(dim: int, rows: int, cols: int) -> Tensor:
    """(rows * cols, dim) table for a row-major grid: half the channels encode the row."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return torch.cat([sincos_1d(dim // 2, r), sincos_1d(dim // 2, c)], dim=1)


# ---------------------------------------------------------------------------------------
# config


@dataclass(frozen=True)
class ModelConfig:
    """Backbone dimensions; defaults are the paper's ``base`` preset."""

    audio_frames: int = 1024  # fbank frames (10 ms each): 10 s of audio
    mel_bins: int = 128  # fbank mel bins
    patch: int = 16  # square patch side, for audio (time x freq) and video pixels
    num_frames: int = 4  # video frames per clip
    frame_size: int = 224  # square frame side in pixels
    dim: int = 768  # encoder width
    heads: int = 12  # encoder attention heads
    modality_layers: int = 10  # modality-specific blocks per modality
    fusion_layers: int = 2  # fusion blocks shared by both modalities
    dec_dim: int = 512  # decoder width
    dec_heads: int = 16  # decoder attention heads
    dec_layers: int = 8  # decoder blocks (shared by audio and video, run separately)
    mlp_ratio: float = 4.0  # MLP hidden width / block width
    mask_ratio: float = 0.8  # fraction of tokens hidden from the encoder
    nce_temperature: float = 0.05  # InfoNCE temperature
    nce_weight: float = 0.1  # weight of the contrastive term
    norm_pix_eps: float = 1e-6  # eps of the per-patch target normalisation

    def __post_init__(self) -> None:
        for name, value in (("audio_frames", self.audio_frames), ("mel_bins", self.mel_bins)):
            if value % self.patch:
                raise ValueError(f"{name}={value} is not a multiple of patch={self.patch}")
        if self.frame_size % self.patch:
            raise ValueError(f"frame_size={self.frame_size} is not a multiple of {self.patch}")
        if self.dim % self.heads or self.dec_dim % self.dec_heads:
            raise ValueError("dim and dec_dim must be divisible by their head counts")

    @property
    def audio_grid(self) -> tuple[int, int]:
        """(time, freq) patches of the fbank map."""
        return self.audio_frames // self.patch, self.mel_bins // self.patch

    @property
    def video_grid(self) -> int:
        """Patches per frame side."""
        return self.frame_size // self.patch

    @property
    def num_audio_tokens(self) -> int:
        return self.audio_grid[0] * self.audio_grid[1]

    @property
    def num_video_tokens(self) -> int:
        return self.num_frames * self.video_grid**2

    @property
    def audio_patch_dim(self) -> int:
        return self.patch * self.patch

    @property
    def video_patch_dim(self) -> int:
        return 3 * self.patch * self.patch

    def n_visible(self, num_tokens: int) -> int:
        """Tokens the encoder sees out of ``num_tokens``: floor((1 - mask_ratio) * L)."""
        return max(1, math.floor(num_tokens * (1.0 - self.mask_ratio) + 1e-9))

    def media(self) -> MediaConfig:
        """The decoding settings that produce this model's input shapes."""
        from worker.core.media import MediaConfig

        return MediaConfig(
            audio_frames=self.audio_frames,
            mel_bins=self.mel_bins,
            num_frames=self.num_frames,
            frame_size=self.frame_size,
        )


PRESETS: dict[str, ModelConfig] = {
    # CPU tests and benchmarks: La = 16 x 8 = 128, Lv = 4 x 6 x 6 = 144.
    "tiny": ModelConfig(
        audio_frames=256,
        frame_size=96,
        dim=192,
        heads=4,
        modality_layers=2,
        fusion_layers=1,
        dec_dim=96,
        dec_heads=4,
        dec_layers=1,
    ),
    # CPU demos and GPU smoke runs: La = 32 x 8 = 256, Lv = 4 x 8 x 8 = 256.
    "small": ModelConfig(
        audio_frames=512,
        frame_size=128,
        dim=384,
        heads=6,
        modality_layers=4,
        fusion_layers=2,
        dec_dim=256,
        dec_heads=8,
        dec_layers=2,
    ),
    # The paper: La = 64 x 8 = 512, Lv = 4 x 14 x 14 = 784.
    "base": ModelConfig(),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A named ``ModelConfig`` (tiny, small, base), optionally with fields overridden."""
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return replace(PRESETS[name], **overrides)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# small parts


class PatchEmbed(nn.Module):
    """Linear projection of flattened patches, (B, K, patch_dim) -> (B, K, D).

    Equivalent to the usual Conv2d with kernel = stride = patch, but it also embeds a
    subset of patches (the only ones FLAVA keeps) without rebuilding an image.
    """

    def __init__(self, patch_dim: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_dim, dim)

    def forward(self, patches: Tensor) -> Tensor:
        return self.proj(patches)


class Attention(nn.Module):
    """Multi-head self-attention over (B, N, D) via scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, d)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x, self.norm1, self.norm2)

    def _run(self, x: Tensor, norm1: nn.Module, norm2: nn.Module) -> Tensor:
        x = x + self.attn(norm1(x))
        return x + self.mlp(norm2(x))


class FusionBlock(Block):
    """Block with shared LNs (norm1/norm2) and per-modality LNs (norm1_a/v, norm2_a/v).

    ``modality`` picks the LayerNorms: "av" the shared ones (joint and code passes),
    "a" or "v" the modality's own (unimodal pass). Attention and MLP are shared.
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__(dim, heads, mlp_ratio)
        self.norm1_a = nn.LayerNorm(dim)
        self.norm1_v = nn.LayerNorm(dim)
        self.norm2_a = nn.LayerNorm(dim)
        self.norm2_v = nn.LayerNorm(dim)

    def forward(self, x: Tensor, modality: str = "av") -> Tensor:
        if modality == "av":
            return self._run(x, self.norm1, self.norm2)
        if modality == "a":
            return self._run(x, self.norm1_a, self.norm2_a)
        if modality == "v":
            return self._run(x, self.norm1_v, self.norm2_v)
        raise ValueError(f"modality must be 'av', 'a' or 'v', got {modality!r}")


def gather(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of x (B, L, D) at idx (B, K) int64 -> (B, K, D)."""
    return torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def gather_pos(table: Tensor, idx: Tensor | None, batch: int) -> Tensor:
    """Positional rows of table (1, L, D) at idx (B, K), or all of them if idx is None."""
    if idx is None:
        return table.expand(batch, -1, -1)
    return gather(table.expand(idx.shape[0], -1, -1), idx)


# ---------------------------------------------------------------------------------------
# named results


class Encoded(NamedTuple):
    """Encoder outputs for the visible tokens.

    joint_a (B, Ka, D), joint_v (B, Kv, D): joint pass, shared final norm (decoder input).
    pooled_a (B, D), pooled_v (B, D): mean of the unimodal pass (contrastive embeddings).
    """

    joint_a: Tensor
    joint_v: Tensor
    pooled_a: Tensor
    pooled_v: Tensor


class MAEOutput(NamedTuple):
    """loss = loss_rec_a + loss_rec_v + nce_weight * loss_nce (all scalars)."""

    loss: Tensor
    loss_rec_a: Tensor
    loss_rec_v: Tensor
    loss_nce: Tensor
    pooled_a: Tensor
    pooled_v: Tensor


# ---------------------------------------------------------------------------------------
# the model


class AVMAE(nn.Module):
    """CAV-MAE / STELLA backbone: modality encoders, fusion blocks, shared decoder.

    Positional embeddings (learnable, sin-cos initialised): audio uses a 2D table over the
    (time, freq) patch grid. Video uses, as the STELLA code does, the per-frame 2D (row,
    col) table repeated for every frame: each (frame, row, col) has its own learnable row,
    but frames start identical and their order is learned. ``inter_pos_embed_*`` is the
    second positional embedding added before the fusion blocks (same initialisation).
    The decoder has per-modality mask tokens and positional tables (sin-cos, learnable).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self._build_encoder(cfg)
        self._build_decoder(cfg)
        self.initialize_weights()

    def _build_encoder(self, cfg: ModelConfig) -> None:
        d, la, lv = cfg.dim, cfg.num_audio_tokens, cfg.num_video_tokens
        self.patch_embed_a = PatchEmbed(cfg.audio_patch_dim, d)
        self.patch_embed_v = PatchEmbed(cfg.video_patch_dim, d)
        self.pos_embed_a = nn.Parameter(torch.zeros(1, la, d))
        self.pos_embed_v = nn.Parameter(torch.zeros(1, lv, d))
        self.inter_pos_embed_a = nn.Parameter(torch.zeros(1, la, d))
        self.inter_pos_embed_v = nn.Parameter(torch.zeros(1, lv, d))
        self.modality_a = nn.Parameter(torch.zeros(1, 1, d))
        self.modality_v = nn.Parameter(torch.zeros(1, 1, d))
        make = [Block(d, cfg.heads, cfg.mlp_ratio) for _ in range(2 * cfg.modality_layers)]
        self.blocks_a = nn.ModuleList(make[: cfg.modality_layers])
        self.blocks_v = nn.ModuleList(make[cfg.modality_layers :])
        self.blocks_u = nn.ModuleList(
            FusionBlock(d, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.fusion_layers)
        )
        self.norm = nn.LayerNorm(d)
        self.norm_a = nn.LayerNorm(d)
        self.norm_v = nn.LayerNorm(d)

    def _build_decoder(self, cfg: ModelConfig) -> None:
        dd, la, lv = cfg.dec_dim, cfg.num_audio_tokens, cfg.num_video_tokens
        self.decoder_embed = nn.Linear(cfg.dim, dd)
        self.mask_token_a = nn.Parameter(torch.zeros(1, 1, dd))
        self.mask_token_v = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_pos_embed_a = nn.Parameter(torch.zeros(1, la, dd))
        self.decoder_pos_embed_v = nn.Parameter(torch.zeros(1, lv, dd))
        self.decoder_modality_a = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_modality_v = nn.Parameter(torch.zeros(1, 1, dd))
        self.decoder_blocks = nn.ModuleList(
            Block(dd, cfg.dec_heads, cfg.mlp_ratio) for _ in range(cfg.dec_layers)
        )
        self.decoder_norm = nn.LayerNorm(dd)
        self.decoder_pred_a = nn.Linear(dd, cfg.audio_patch_dim)
        self.decoder_pred_v = nn.Linear(dd, cfg.video_patch_dim)

    # -- initialisation -----------------------------------------------------------------

    def audio_pos_table(self, dim: int) -> Tensor:
        """(1, La, dim) sin-cos table over the time-major (time, freq) patch grid."""
        return sincos_2d(dim, *self.cfg.audio_grid).unsqueeze(0)

    def video_pos_table(self, dim: int) -> Tensor:
        """(1, Lv, dim) per-frame 2D sin-cos table, repeated for every frame."""
        g = self.cfg.video_grid
        return sincos_2d(dim, g, g).repeat(self.cfg.num_frames, 1).unsqueeze(0)

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """MAE init: sin-cos tables, xavier_uniform Linear, LN (1, 0), normal(0.02) tokens."""
        d, dd = self.cfg.dim, self.cfg.dec_dim
        for p in (self.pos_embed_a, self.inter_pos_embed_a):
            p.copy_(self.audio_pos_table(d))
        for p in (self.pos_embed_v, self.inter_pos_embed_v):
            p.copy_(self.video_pos_table(d))
        self.decoder_pos_embed_a.copy_(self.audio_pos_table(dd))
        self.decoder_pos_embed_v.copy_(self.video_pos_table(dd))
        for p in (self.modality_a, self.modality_v, self.decoder_modality_a):
            nn.init.normal_(p, std=0.02)
        for p in (self.decoder_modality_v, self.mask_token_a, self.mask_token_v):
            nn.init.normal_(p, std=0.02)
        self.apply(_init_module)

    # -- patches ------------------------------------------------------------------------

    def patchify_audio(self, fbank: Tensor) -> Tensor:
        """(B, Ta, F) -> (B, La, p*p), time-major tokens, pixels (time, freq) in a patch."""
        b, p = fbank.shape[0], self.cfg.patch
        t, f = self.cfg.audio_grid
        x = fbank.reshape(b, t, p, f, p).permute(0, 1, 3, 2, 4)  # (B, t, f, p_t, p_f)
        return x.reshape(b, t * f, p * p)

    def patchify_video(self, frames: Tensor) -> Tensor:
        """(B, T, 3, S, S) -> (B, Lv, p*p*3), pixels (row, col, channel) in a patch."""
        b, t, c, p, g = *frames.shape[:3], self.cfg.patch, self.cfg.video_grid
        x = frames.reshape(b, t, c, g, p, g, p).permute(0, 1, 3, 5, 4, 6, 2)
        return x.reshape(b, t * g * g, p * p * c)

    def unpatchify_audio(self, patches: Tensor) -> Tensor:
        """Inverse of ``patchify_audio``: (B, La, p*p) -> (B, Ta, F)."""
        b, p = patches.shape[0], self.cfg.patch
        t, f = self.cfg.audio_grid
        x = patches.reshape(b, t, f, p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(b, t * p, f * p)

    def unpatchify_video(self, patches: Tensor) -> Tensor:
        """Inverse of ``patchify_video``: (B, Lv, p*p*3) -> (B, T, 3, S, S)."""
        b, p, g, t = patches.shape[0], self.cfg.patch, self.cfg.video_grid, self.cfg.num_frames
        x = patches.reshape(b, t, g, g, p, p, 3).permute(0, 1, 6, 2, 4, 3, 5)
        return x.reshape(b, t, 3, g * p, g * p)

    # -- encoder stages -----------------------------------------------------------------

    def check_inputs(self, fbank: Tensor, frames: Tensor) -> None:
        """Raise ValueError unless fbank and frames have this config's shapes."""
        c = self.cfg
        want_a = (c.audio_frames, c.mel_bins)
        want_v = (c.num_frames, 3, c.frame_size, c.frame_size)
        if tuple(fbank.shape[1:]) != want_a or tuple(frames.shape[1:]) != want_v:
            raise ValueError(
                f"expected fbank (B, {want_a[0]}, {want_a[1]}) and frames (B, {want_v}); "
                f"got {tuple(fbank.shape)} and {tuple(frames.shape)}"
            )

    def tokenize(self, fbank: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """All tokens: (B, La, D) audio and (B, Lv, D) video, with position + modality."""
        self.check_inputs(fbank, frames)
        pa, pv = self.patchify_audio(fbank), self.patchify_video(frames)
        return self.tokenize_patches(pa, None, pv, None)

    def tokenize_patches(
        self, patches_a: Tensor, idx_a: Tensor | None, patches_v: Tensor, idx_v: Tensor | None
    ) -> tuple[Tensor, Tensor]:
        """Embed a subset of patches: patches (B, K, patch_dim) sitting at idx (B, K).

        idx None means all tokens in order. Returns (B, Ka, D), (B, Kv, D).
        """
        xa = self.patch_embed_a(patches_a) + self.modality_a
        xv = self.patch_embed_v(patches_v) + self.modality_v
        xa = xa + gather_pos(self.pos_embed_a, idx_a, xa.shape[0])
        return xa, xv + gather_pos(self.pos_embed_v, idx_v, xv.shape[0])

    def forward_modality(
        self, xa: Tensor, xv: Tensor, idx_a: Tensor | None = None, idx_v: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Modality-specific blocks on any token subset, plus the fusion pos embedding.

        xa (B, Ka, D), xv (B, Kv, D) from ``tokenize``/``gather``; idx_* (B, K) their
        positions (None = all tokens in order) for the second positional embedding.
        Returns (ha, hv) with the same shapes, ready for the fusion blocks.
        """
        for blk in self.blocks_a:
            xa = blk(xa)
        for blk in self.blocks_v:
            xv = blk(xv)
        xa = xa + gather_pos(self.inter_pos_embed_a, idx_a, xa.shape[0])
        return xa, xv + gather_pos(self.inter_pos_embed_v, idx_v, xv.shape[0])

    def _fuse(self, x: Tensor, modality: str) -> Tensor:
        for blk in self.blocks_u:
            x = blk(x, modality)
        return x

    def forward_joint(self, ha: Tensor, hv: Tensor) -> tuple[Tensor, Tensor]:
        """Fusion blocks over [a; v] with shared LNs + shared final norm -> (ja, jv)."""
        x = self.norm(self._fuse(torch.cat([ha, hv], dim=1), "av"))
        return x[:, : ha.shape[1]], x[:, ha.shape[1] :]

    def forward_unimodal(self, h: Tensor, modality: str) -> Tensor:
        """Fusion blocks on one modality with its own LNs + its final norm: (B, K, D)."""
        final = self.norm_a if modality == "a" else self.norm_v
        return final(self._fuse(h, modality))

    def forward_code(self, ha: Tensor, hv: Tensor) -> tuple[Tensor, Tensor]:
        """The code pass that feeds the AVM: (za (B, La, D), zv (B, Lv, D)).

        As in the STELLA code: the (frozen, all-token) modality outputs go through the
        fusion blocks JOINTLY over [a; v] with the shared LNs, and are taken before the
        final norm. The pair is whatever the caller passes (the AVM deranges videos for
        its negatives before calling).
        """
        x = self._fuse(torch.cat([ha, hv], dim=1), "av")
        return x[:, : ha.shape[1]], x[:, ha.shape[1] :]

    def forward_encoder(
        self, fbank: Tensor, frames: Tensor, vis_a: Tensor, vis_v: Tensor
    ) -> Encoded:
        """Encode the visible tokens vis_a (B, Ka), vis_v (B, Kv) of each clip."""
        self.check_inputs(fbank, frames)
        pa = gather(self.patchify_audio(fbank), vis_a)
        pv = gather(self.patchify_video(frames), vis_v)
        xa, xv = self.tokenize_patches(pa, vis_a, pv, vis_v)
        ha, hv = self.forward_modality(xa, xv, vis_a, vis_v)
        ja, jv = self.forward_joint(ha, hv)
        pooled_a = self.forward_unimodal(ha, "a").mean(dim=1)
        return Encoded(ja, jv, pooled_a, self.forward_unimodal(hv, "v").mean(dim=1))

    # -- decoder ------------------------------------------------------------------------

    def forward_decoder(
        self, enc_tokens: Tensor, vis_idx: Tensor, tgt_idx: Tensor, modality: str
    ) -> Tensor:
        """Predict the target patches of one modality: pred (B, Kt, patch_dim).

        enc_tokens (B, Kv, D) are the encoded visible tokens at vis_idx (B, Kv); mask
        tokens stand at tgt_idx (B, Kt). Every token gets its original position's decoder
        embedding; the sequence is Kv + Kt long, tokens in neither set are absent.
        """
        audio = modality == "a"
        mask_token = self.mask_token_a if audio else self.mask_token_v
        pos = self.decoder_pos_embed_a if audio else self.decoder_pos_embed_v
        x = self.decoder_embed(enc_tokens)
        masks = mask_token.expand(x.shape[0], tgt_idx.shape[1], -1)
        x = torch.cat([x, masks.to(x.dtype)], dim=1)  # (B, Kv + Kt, dec_dim)
        x = x + gather_pos(pos, torch.cat([vis_idx, tgt_idx], dim=1), x.shape[0])
        x = x + (self.decoder_modality_a if audio else self.decoder_modality_v)
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x[:, vis_idx.shape[1] :])  # only targets are predicted
        return (self.decoder_pred_a if audio else self.decoder_pred_v)(x)

    # -- losses -------------------------------------------------------------------------

    def reconstruction_loss(self, pred: Tensor, target_patches: Tensor, tgt_idx: Tensor) -> Tensor:
        """Per-patch normalised MSE over the targets.

        pred (B, Kt, P); target_patches (B, L, P) all patches; tgt_idx (B, Kt).
        """
        target = gather(target_patches, tgt_idx).float()
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as MAE's norm_pix_loss
        target = (target - mean) / (var + self.cfg.norm_pix_eps).sqrt()
        return (pred.float() - target).pow(2).mean()

    def forward_loss(
        self,
        fbank: Tensor,
        frames: Tensor,
        enc: Encoded,
        idx: tuple[Tensor, Tensor, Tensor, Tensor],
    ) -> MAEOutput:
        """Losses from an ``Encoded``; idx = (vis_a, tgt_a, vis_v, tgt_v)."""
        vis_a, tgt_a, vis_v, tgt_v = idx
        pred_a = self.forward_decoder(enc.joint_a, vis_a, tgt_a, "a")
        pred_v = self.forward_decoder(enc.joint_v, vis_v, tgt_v, "v")
        rec_a = self.reconstruction_loss(pred_a, self.patchify_audio(fbank), tgt_a)
        rec_v = self.reconstruction_loss(pred_v, self.patchify_video(frames), tgt_v)
        nce = contrastive_loss(enc.pooled_a, enc.pooled_v, self.cfg.nce_temperature)
        loss = rec_a + rec_v + self.cfg.nce_weight * nce
        return MAEOutput(loss, rec_a, rec_v, nce, enc.pooled_a, enc.pooled_v)

    def mae_loss(
        self,
        fbank: Tensor,
        frames: Tensor,
        vis_a: Tensor,
        tgt_a: Tensor,
        vis_v: Tensor,
        tgt_v: Tensor,
    ) -> MAEOutput:
        """Masked reconstruction + contrastive loss for one batch.

        vis_* (B, K) tokens the encoder sees, tgt_* (B, Kt) tokens reconstructed. Pixels
        of tokens in neither set are never read, so a clip stored as selected patches
        only may be rebuilt with zeros elsewhere (``unpatchify_*``).
        """
        enc = self.forward_encoder(fbank, frames, vis_a, vis_v)
        return self.forward_loss(fbank, frames, enc, (vis_a, tgt_a, vis_v, tgt_v))

    def forward(
        self,
        fbank: Tensor,
        frames: Tensor,
        vis_a: Tensor,
        tgt_a: Tensor,
        vis_v: Tensor,
        tgt_v: Tensor,
    ) -> MAEOutput:
        """Same as ``mae_loss`` (so DDP wraps the training computation)."""
        return self.mae_loss(fbank, frames, vis_a, tgt_a, vis_v, tgt_v)

    # -- embeddings ---------------------------------------------------------------------

    def embed(self, fbank: Tensor, frames: Tensor) -> tuple[Tensor, Tensor]:
        """Retrieval embeddings of unmasked clips: (emb_a (B, D), emb_v (B, D)).

        Mean of the unimodal pass over all tokens, un-normalised (L2-normalise to compare).
        Gradients are the caller's choice (wrap in torch.no_grad to serve).
        """
        xa, xv = self.tokenize(fbank, frames)
        return self.embed_from_hidden(*self.forward_modality(xa, xv))

    def embed_from_hidden(self, ha: Tensor, hv: Tensor) -> tuple[Tensor, Tensor]:
        """Finish ``embed`` from ``forward_modality`` outputs on all tokens (B, L, D)."""
        emb_a = self.forward_unimodal(ha, "a").mean(dim=1)
        return emb_a, self.forward_unimodal(hv, "v").mean(dim=1)


def _init_module(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def contrastive_loss(pooled_a: Tensor, pooled_v: Tensor, temperature: float) -> Tensor:
    """Bidirectional InfoNCE on L2-normalised (B, D) embeddings; pair i is row i."""
    a = F.normalize(pooled_a.float(), dim=-1)
    v = F.normalize(pooled_v.float(), dim=-1)
    logits = a @ v.t() / temperature  # (B, B): audio i vs video j
    labels = torch.arange(a.shape[0], device=a.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


# ---------------------------------------------------------------------------------------
# masking helpers (randomness through a passed generator)


def random_split(
    batch: int,
    num_tokens: int,
    n_visible: int,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Plain MAE masking: vis (B, n_visible), tgt (B, L - n_visible), disjoint, random.

    Noise is drawn on the generator's device and moved to ``device``.
    """
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.rand(batch, num_tokens, generator=generator, device=gen_device)
    order = noise.argsort(dim=1).to(device)
    return order[:, :n_visible], order[:, n_visible:]


def split_selected(
    selected: Tensor, n_visible: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """Pick n_visible of a selected set (B, K) at random as visible, the rest targets.

    Returns vis (B, n_visible), tgt (B, K - n_visible), both subsets of ``selected``.
    """
    if not 0 < n_visible <= selected.shape[1]:
        raise ValueError(f"n_visible={n_visible} outside (0, {selected.shape[1]}]")
    gen_device = generator.device if generator is not None else "cpu"
    noise = torch.rand(selected.shape, generator=generator, device=gen_device)
    shuffled = torch.gather(selected, 1, noise.argsort(dim=1).to(selected.device))
    return shuffled[:, :n_visible], shuffled[:, n_visible:]
