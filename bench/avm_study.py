"""Why does the AVM stop at ~0.72 on unseen tasks? Variants of its training, side by side.

Every variant trains a fresh AVM (same seed, same batches, same matching pairs) on one frozen
backbone, reading the cached code-pass inputs of the pretraining scenes (``CodeCache``), and
is measured every ``--eval-every`` updates on held-out pretraining scenes ("held") and on the
unseen tasks' held-out scenes ("unseen"): matching accuracy (chance 0.5, mean over
``--draws`` draws of the deranged negatives) and localization AUC of the video importance
(sounding object vs distractor tokens, chance 0.5; shuffled-audio control beside it).

    python -m bench.avm_study --data .cache/flava-pretrain/data-tiny-*.pt \
        --weights worker/builtin/tiny.pt --variants base,wd --out bench/results/avm_study

Variants (each changes one thing against ``base``, the authors' AVM at PretrainConfig's lr):
- ``base``: Adam at 1e-3, mean-pooled attention outputs (the authors' matching head);
- ``wd``: AdamW, weight decay 0.05 (is it memorising?);
- ``drop``: each update keeps a random half of each clip's audio and video tokens (an
  augmentation the cache allows for free);
- ``sharp``: the matching head's attention logits x4 (is the mean over all tokens too diluted
  for the head to see the object?);
- ``cand``: the matching head reads only the candidates, each modality's top half by
  importance (does pooling where selection looks make the importance aim?).

``--ablate`` measures instead what the AVM in ``--weights`` looks at: its mean P(match) on the
true pairs of the held-out sets when the video keeps all tokens, all but the sounding
object's, the object's only, all but the distractors', or the background only (and on
deranged pairs, for scale).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from bench.continual.probes import localization
from worker.core.avm import AVM, QKV, AVMProjections, MatchingResult
from worker.core.clipset import ClipSet, batch_order, chunks
from worker.core.learner import LearnerConfig, build_learner
from worker.core.model import AVMAE, preset
from worker.core.pretrain import CodeCache, match_codes
from worker.core.selection import candidates
from worker.warmstart import warm_start


class SharpAVM(AVM):
    """The AVM with its matching attention ``factor`` times sharper (importance unchanged)."""

    factor = 4.0

    def match_logit(self, a: QKV, v: QKV) -> Tensor:
        scale = self.scale * self.factor
        video_side = F.scaled_dot_product_attention(v.q, a.k, a.v, scale=scale).mean(dim=2)
        audio_side = F.scaled_dot_product_attention(a.q, v.k, v.v, scale=scale).mean(dim=2)
        return self.head(torch.cat([video_side.flatten(1), audio_side.flatten(1)], 1)).squeeze(-1)


class CandidateAVM(AVM):
    """The AVM whose matching head reads only the candidates: each modality's top half by
    importance (as selection picks them) is all the other modality's queries attend to, and
    all that is pooled."""

    def match_logit(self, a: QKV, v: QKV) -> Tensor:
        imp = self.importance(AVMProjections(a=a, v=v))
        cand_a = candidates(imp.a, self.cfg.candidate_ratio)  # (B, La) bool
        cand_v = candidates(imp.v, self.cfg.candidate_ratio)  # (B, Lv) bool
        attend = F.scaled_dot_product_attention
        video = attend(v.q, a.k, a.v, attn_mask=cand_a[:, None, None, :], scale=self.scale)
        audio = attend(a.q, v.k, v.v, attn_mask=cand_v[:, None, None, :], scale=self.scale)
        video_side = _masked_mean(video, cand_v)  # (B, H, d) over candidate video queries
        audio_side = _masked_mean(audio, cand_a)
        return self.head(torch.cat([video_side.flatten(1), audio_side.flatten(1)], 1)).squeeze(-1)


def _masked_mean(x: Tensor, keep: Tensor) -> Tensor:
    """Mean of x (B, H, L, d) over the positions keep (B, L) marks: (B, H, d)."""
    w = keep[:, None, :, None].to(x.dtype)
    return (x * w).sum(2) / w.sum(2)


@dataclass(frozen=True)
class Variant:
    avm_class: type[AVM] = AVM
    weight_decay: float = 0.0
    keep: float = 1.0  # share of each clip's tokens an update sees


VARIANTS = {
    "base": Variant(),
    "wd": Variant(weight_decay=0.05),
    "drop": Variant(keep=0.5),
    "sharp": Variant(avm_class=SharpAVM),
    "cand": Variant(avm_class=CandidateAVM),
}


def keep_tokens(ha: Tensor, hv: Tensor, keep: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """A random ``keep`` share of each clip's audio (B, La, D) and video (B, Lv, D) tokens."""
    if keep >= 1.0:
        return ha, hv

    def pick(h: Tensor) -> Tensor:
        b, n, d = h.shape
        idx = torch.rand(b, n, generator=gen).argsort(1)[:, : max(1, int(n * keep))]
        return h.gather(1, idx[..., None].expand(-1, -1, d))

    return pick(ha), pick(hv)


@torch.no_grad()
def cached_accuracy(model: AVMAE, avm: AVM, codes: CodeCache, draws: int, chunk: int = 32) -> float:
    """Matching accuracy over ``draws`` draws of half true / half deranged pairs per chunk."""
    gen = torch.Generator().manual_seed(0)
    hits, total = 0.0, 0
    for _ in range(draws):
        for idx in chunks(len(codes.ha), chunk):
            if len(idx) >= 3:
                m = match_codes(model, avm, codes.ha[idx], codes.hv[idx], gen)
                hits, total = hits + float(m.acc) * len(idx), total + len(idx)
    return hits / total


def train_variant(
    name: str,
    model: AVMAE,
    sets: dict[str, ClipSet],
    codes: dict[str, CodeCache],
    args: argparse.Namespace,
    report: Callable[[dict[str, Any]], None],
) -> AVM:
    """Train one variant, reporting a row per evaluation; the trained AVM."""
    variant = VARIANTS[name]
    torch.manual_seed(args.seed)
    avm = variant.avm_class(_avm_config(model))
    betas = LearnerConfig().betas  # PretrainConfig's AVM optimizer: Adam at lr, these betas
    opt = torch.optim.AdamW(avm.parameters(), args.lr, betas, weight_decay=variant.weight_decay)
    order = batch_order(len(codes["train"].ha), args.steps, 16, np.random.default_rng(args.seed))
    gen, drop_gen = torch.Generator().manual_seed(args.seed), torch.Generator().manual_seed(1)
    accs, started = [], time.perf_counter()
    for i, idx in enumerate(order, start=1):
        ha, hv = keep_tokens(codes["train"].ha[idx], codes["train"].hv[idx], variant.keep, drop_gen)
        match: MatchingResult = match_codes(model, avm, ha, hv, gen)
        opt.zero_grad(set_to_none=True)
        match.loss.backward()
        opt.step()
        accs.append(float(match.acc))
        if i % args.eval_every == 0 or i == len(order):
            row = {"variant": name, "updates": i, "train_acc_last200": float(np.mean(accs[-200:]))}
            for split in ("held", "unseen"):
                row[f"{split}_acc"] = cached_accuracy(model, avm, codes[split], args.draws)
            loc = localization(model, avm, sets["unseen"])
            row.update({f"unseen_{k}": v for k, v in loc.items()})
            row["seconds"] = time.perf_counter() - started
            report(row)
    return avm


# video tokens a true pair keeps: (objects (Lv,), distractors (Lv,)) -> (Lv,) bool
ABLATIONS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "all": lambda obj, dis: torch.ones_like(obj),
    "no_object": lambda obj, dis: ~obj,
    "object_only": lambda obj, dis: obj,
    "no_distractors": lambda obj, dis: ~dis,
    "background_only": lambda obj, dis: ~obj & ~dis,
}


@torch.no_grad()
def ablation(model: AVMAE, avm: AVM, clips: ClipSet) -> dict[str, dict[str, float]]:
    """Mean P(match) and the share judged a match (P > 0.5) of true pairs per kept token set
    (ABLATIONS), and of deranged pairs (each clip's audio with the video of clip i + 7).
    One clip at a time: the sets differ in length."""
    assert clips.distractors is not None, "needs scenes with distractor masks"
    probs: dict[str, list[float]] = {name: [] for name in [*ABLATIONS, "deranged"]}
    codes = CodeCache.build(model, clips)
    for i in range(len(clips)):
        ha = codes.ha[i : i + 1]
        for name, keep in ABLATIONS.items():
            mask = keep(clips.objects[i], clips.distractors[i])
            za, zv = model.forward_code(ha, codes.hv[i : i + 1, mask])
            probs[name].append(float(avm.match(za, zv, torch.ones(1)).logits.sigmoid()))
        j = (i + 7) % len(clips)
        za, zv = model.forward_code(ha, codes.hv[j : j + 1])
        probs["deranged"].append(float(avm.match(za, zv, torch.zeros(1)).logits.sigmoid()))
    return {
        name: {"p_match": float(np.mean(p)), "judged_match": float(np.mean(np.array(p) > 0.5))}
        for name, p in probs.items()
    }


def _avm_config(model: AVMAE) -> Any:
    learner = build_learner("flava", model.cfg, LearnerConfig(memory_size=1))
    return learner.extra_modules["avm"].cfg


def write_summary(out: Path) -> Path:
    """summary.md: one table row per variant and evaluation, from the *.jsonl curves in out."""
    lines = [
        "| variant | updates | train (last 200) | held | unseen | loc. AUC unseen | shuffled |",
        "|---|---|---|---|---|---|---|",
    ]
    for path in sorted(out.glob("*.jsonl")):
        for row in map(json.loads, path.read_text().splitlines()):
            figures = (row["train_acc_last200"], row["held_acc"], row["unseen_acc"])
            figures += (row["unseen_auc"], row["unseen_auc_shuffled"])
            cells = " | ".join(f"{v:.3f}" for v in figures)
            lines.append(f"| {row['variant']} | {row['updates']} | {cells} |")
    path = out / "summary.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _loaded_avm(weights: Path) -> AVM:
    learner = build_learner("flava", preset("tiny"), LearnerConfig(memory_size=1))
    warm_start(learner, weights)
    return learner.extra_modules["avm"].eval()  # type: ignore[return-value]


def load(args: argparse.Namespace) -> tuple[AVMAE, dict[str, ClipSet]]:
    """The frozen backbone from ``--weights`` and the pretraining data's three sets."""
    learner = build_learner("flava", preset("tiny"), LearnerConfig(memory_size=1))
    warm_start(learner, args.weights)
    model = learner.model.eval().requires_grad_(False)
    saved = torch.load(args.data, weights_only=True)
    sets = {k: ClipSet.from_state_dict(v) for k, v in saved.items()}
    return model, {"train": sets["train"], "held": sets["heldout"], "unseen": sets["unseen"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, help="flava pretrain's data file")
    p.add_argument("--weights", type=Path, help="the frozen backbone")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--draws", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--ablate", action="store_true", help="what the AVM in --weights uses")
    p.add_argument("--summary", action="store_true", help="only tabulate the curves in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.summary:
        print(write_summary(args.out).read_text())
        return 0
    model, sets = load(args)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.ablate:
        avm = _loaded_avm(args.weights)
        rows = {split: ablation(model, avm, sets[split]) for split in ("held", "unseen")}
        rows["weights"] = str(args.weights)  # type: ignore[assignment]
        (args.out / "ablation.json").write_text(json.dumps(rows, indent=1) + "\n")
        print(json.dumps(rows))
        return 0
    codes = {k: CodeCache.build(model, s) for k, s in sets.items()}
    for name in args.variants.split(","):
        path = args.out / f"{name}.jsonl"
        with path.open("w") as f:

            def report(row: dict[str, Any], f: Any = f) -> None:
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
                f.flush()

            avm = train_variant(name, model, sets, codes, args, report)
        torch.save(avm.state_dict(), args.out / f"{name}-avm.pt")
    write_summary(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
