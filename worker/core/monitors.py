"""Drift and forgetting monitors: plain tensors in, plain numbers out (no Redis, no Prometheus).

Drift (docs/design.md section 7): per modality, MMD^2 and mean shift between a *reference*
window and the *recent* window of the embeddings of incoming clips, plus the drift of two
model-free input statistics:

- loudness: the mean of a clip's normalised log-mel fbank, (fbank (T, F)).mean(), in the
  units of the model input ((log-mel + 5.081) / 4.4849 for CAV-MAE's statistics; padded
  frames count, so a shorter clip reads quieter);
- brightness: the mean pixel of a clip's frames in [0, 1], ImageNet normalisation undone.

The reference window holds the first ``window`` clips seen (or the first after
``rereference()``, e.g. at a segment change); the recent window the last ``window`` clips
seen after it. Embeddings are those computed when each clip arrived, so embedding drift
mixes input drift with the model's own change; the input statistics see input drift only.

Each modality's MMD^2 comes with a decision: a permutation test (worker/core/mmd.py) gives
its p-value and the threshold it must exceed, at level ``alpha / modalities`` each, so that
"some modality drifted" is a false alarm with probability at most ``alpha`` when the two
windows come from one distribution (Bonferroni over the modalities). Its z-score against the
permutation null (scale-free, whatever the embedding width) is the series the worker's
change-point test watches (worker/core/changepoint.py).

Forgetting: ``ForgettingTracker`` keeps, per window (task), the history of retrieval
recall on that window's held-out probes (R@K in percent, as ``recall_at_k``) and their
reconstruction loss; forgetting = best-so-far minus current (docs/design.md section 5).

Compatibility: ``CompatibilityTracker`` keeps, per window, the probe embeddings of the last
few evaluations with the version that made them, and measures cross-version retrieval: R@1 of
the probes embedded by the current version (queries) against the same probes embedded by the
version ``lag`` evaluations earlier (gallery), and its ratio to same-version R@1 on the same
probes. An online learner moves its space every update; this says how far an index built by
an older version still serves queries of the newest (docs/versions.md, docs/compat.md).

The monitors have ``state_dict`` / ``load_state_dict`` made of tensors and plain containers
only (what ``torch.load(weights_only=True)`` accepts), so the worker's checkpoint carries
them across restarts and a restored monitor reports the same figures.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from worker.core.learner import Batch, Learner
from worker.core.media import IMAGENET_MEAN, IMAGENET_STD
from worker.core.mmd import mmd2_permutation_test
from worker.core.model import ModelConfig, random_split
from worker.core.retrieval import recall_against, recall_at_k

# ---------------------------------------------------------------------------------------
# two-sample statistics (MMD^2 and its permutation test: worker/core/mmd.py)


def mean_shift(x: Tensor, y: Tensor, normalise: bool = True) -> float:
    """L2 distance between the means of x (N, D) and y (M, D).

    With ``normalise`` it is divided by the samples' spread, sqrt of the mean of their
    total variances (trace of the covariance), so it reads in standard deviations and
    does not change when the embeddings are rescaled.
    """
    x, y = x.detach().double().cpu(), y.detach().double().cpu()
    shift = float((x.mean(0) - y.mean(0)).norm())
    if not normalise:
        return shift
    spread = 0.5 * (_total_variance(x) + _total_variance(y))
    return shift / max(spread, 1e-12) ** 0.5


def _total_variance(x: Tensor) -> float:
    """Trace of the (biased) covariance of x (N, D): mean squared distance to the mean."""
    return float((x - x.mean(0)).pow(2).sum(1).mean())


# ---------------------------------------------------------------------------------------
# input statistics


def clip_loudness(fbank: Tensor) -> Tensor:
    """fbank (B, T, F) normalised log-mel -> (B,) mean value per clip."""
    return fbank.detach().float().mean(dim=(1, 2)).cpu()


def clip_brightness(frames: Tensor) -> Tensor:
    """frames (B, T, 3, S, S) ImageNet-normalised -> (B,) mean pixel in [0, 1] per clip."""
    mean = IMAGENET_MEAN.to(frames.device)
    std = IMAGENET_STD.to(frames.device)
    pixels = frames.detach().float() * std + mean  # (B, T, 3, S, S) in [0, 1]
    return pixels.mean(dim=(1, 2, 3, 4)).cpu()


# ---------------------------------------------------------------------------------------
# drift monitor


@dataclass(frozen=True)
class DriftConfig:
    """Window sizes and the drift decision of the drift monitor (it runs on every batch)."""

    window: int = 64  # clips in the reference window and in the recent window
    min_samples: int = 8  # report once both windows hold at least this many (>= 2)
    normalise_shift: bool = True  # mean shift in standard deviations (see mean_shift)
    # false-alarm rate of "drifted" over all modalities when nothing drifted (module doc)
    alpha: float = 0.01
    # relabellings drawn per test: the p-value's resolution is 1 / (permutations + 1), and
    # at 999 and windows of 64, 6 to 14 ms per modality per batch (docs/operations.md)
    permutations: int = 999
    seed: int = 0  # of the permutations (a torch.Generator), so a run repeats exactly

    def __post_init__(self) -> None:
        if not 2 <= self.min_samples <= self.window:
            raise ValueError(f"need 2 <= min_samples <= window, got {self}")
        if not 0 < self.alpha < 1 or self.permutations < 1:
            raise ValueError(f"need 0 < alpha < 1 and permutations >= 1, got {self}")


@dataclass
class ModalityDrift:
    mmd2: float  # unbiased MMD^2, RBF kernel, median bandwidth
    mean_shift: float  # distance of the window means (in std units when normalised)
    # the permutation test at level alpha / modalities (None in reports saved before it)
    pvalue: float | None = None
    threshold: float | None = None  # drifted <=> mmd2 > threshold; None: unreachable
    zscore: float | None = None  # (mmd2 - null mean) / null std
    drifted: bool | None = None


@dataclass
class InputDrift:
    reference: float  # mean of the statistic over the reference window
    recent: float  # mean over the recent window
    zscore: float  # (recent - reference) / std of the reference window


@dataclass
class DriftReport:
    """Drift between the reference and recent windows, per modality and input statistic."""

    modalities: dict[str, ModalityDrift]
    inputs: dict[str, InputDrift]
    reference_size: int
    recent_size: int
    alpha: float | None = None  # false-alarm rate of ``drifted`` (None: saved before it)

    @property
    def drifted(self) -> bool:
        """Whether some modality's test rejected "same distribution"."""
        return any(m.drifted for m in self.modalities.values())

    def as_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> DriftReport:
        """Inverse of ``as_dict``."""
        return cls(
            {name: ModalityDrift(**m) for name, m in d["modalities"].items()},
            {name: InputDrift(**i) for name, i in d["inputs"].items()},
            int(d["reference_size"]),
            int(d["recent_size"]),
            d.get("alpha"),
        )


class _Windows:
    """Reference rows (the first ``size`` after a reset) and the last ``size`` rows after."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.reference: list[Tensor] = []
        self.recent: deque[Tensor] = deque(maxlen=size)

    def add(self, rows: Tensor) -> None:
        """rows (B, D): fill the reference first, then the recent window."""
        for row in rows.detach().float().cpu():
            if len(self.reference) < self.size:
                self.reference.append(row)
            else:
                self.recent.append(row)

    def tensors(self) -> tuple[Tensor, Tensor]:
        """(reference (R, D), recent (N, D)); call only when both are non-empty."""
        return torch.stack(self.reference), torch.stack(list(self.recent))

    def reset(self) -> None:
        self.reference.clear()
        self.recent.clear()

    def state_dict(self) -> dict[str, Tensor]:
        """{"reference": (R, D), "recent": (N, D)} float32 (an empty window: shape (0,))."""
        return {"reference": _stack(self.reference), "recent": _stack(list(self.recent))}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        """Restore ``state_dict()``; rows beyond ``size`` are cut (the first reference rows
        and the last recent rows stay, as if they had arrived with this size)."""
        self.reference = list(state["reference"].float())[: self.size]
        self.recent = deque(state["recent"].float(), maxlen=self.size)


def _stack(rows: list[Tensor]) -> Tensor:
    return torch.stack(rows) if rows else torch.empty(0)


class DriftMonitor:
    """Reference vs recent windows of embeddings (per modality) and input statistics.

    ``update`` takes embeddings {"audio": (B, D), "video": (B, D)} and statistics
    {"loudness": (B,), "brightness": (B,)} of the same B clips; ``report`` compares the
    windows (None until both hold ``min_samples`` clips).
    """

    def __init__(self, cfg: DriftConfig | None = None) -> None:
        self.cfg = cfg or DriftConfig()
        self.embeddings: dict[str, _Windows] = {}
        self.inputs: dict[str, _Windows] = {}
        self.generator = torch.Generator().manual_seed(self.cfg.seed)

    def update(self, embeddings: dict[str, Tensor], inputs: dict[str, Tensor]) -> None:
        for name, rows in embeddings.items():
            self.embeddings.setdefault(name, _Windows(self.cfg.window)).add(rows)
        for name, values in inputs.items():
            self.inputs.setdefault(name, _Windows(self.cfg.window)).add(values.reshape(-1, 1))

    def rereference(self) -> None:
        """Start a new reference window from the next clips (e.g. at a segment change)."""
        for w in [*self.embeddings.values(), *self.inputs.values()]:
            w.reset()

    def sizes(self) -> tuple[int, int]:
        """(reference, recent) clips held, over the first tracked series."""
        first = next(iter([*self.embeddings.values(), *self.inputs.values()]), None)
        return (len(first.reference), len(first.recent)) if first else (0, 0)

    def report(self) -> DriftReport | None:
        ref_n, recent_n = self.sizes()
        if min(ref_n, recent_n) < self.cfg.min_samples:
            return None
        return DriftReport(
            {name: self._modality(w) for name, w in self.embeddings.items()},
            {name: _input_drift(*w.tensors()) for name, w in self.inputs.items()},
            ref_n,
            recent_n,
            self.cfg.alpha,
        )

    def state_dict(self) -> dict:
        """The windows of every series, {"embeddings"|"inputs": {name: _Windows state}}, and
        "permutations": the state (uint8 tensor) of the generator the tests draw from."""
        return {
            "embeddings": {n: w.state_dict() for n, w in self.embeddings.items()},
            "inputs": {n: w.state_dict() for n, w in self.inputs.items()},
            "permutations": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.embeddings = _load_windows(state["embeddings"], self.cfg.window)
        self.inputs = _load_windows(state["inputs"], self.cfg.window)
        if "permutations" in state:  # absent from checkpoints older than the test
            self.generator.set_state(state["permutations"])

    @property
    def level(self) -> float:
        """Each modality's test level: ``alpha`` shared among the modalities tracked."""
        return self.cfg.alpha / max(1, len(self.embeddings))

    def _modality(self, windows: _Windows) -> ModalityDrift:
        ref, recent = windows.tensors()
        shift = mean_shift(ref, recent, self.cfg.normalise_shift)
        test = mmd2_permutation_test(ref, recent, self.level, self.cfg.permutations, self.generator)
        threshold = test.threshold if math.isfinite(test.threshold) else None
        drifted = threshold is not None and test.mmd2 > threshold
        return ModalityDrift(test.mmd2, shift, test.pvalue, threshold, test.zscore, drifted)


def _load_windows(states: dict[str, dict[str, Tensor]], size: int) -> dict[str, _Windows]:
    out = {}
    for name, state in states.items():
        out[name] = _Windows(size)
        out[name].load_state_dict(state)
    return out


def _input_drift(ref: Tensor, recent: Tensor) -> InputDrift:
    """ref (R, 1), recent (N, 1) values of one statistic -> their means and z-scored shift."""
    r_mean, n_mean = float(ref.mean()), float(recent.mean())
    std = float(ref.std()) if ref.shape[0] > 1 else 0.0
    return InputDrift(r_mean, n_mean, (n_mean - r_mean) / max(std, 1e-6))


# ---------------------------------------------------------------------------------------
# probe evaluation


@dataclass
class ProbeEvaluation:
    """One evaluation of a window's probes by the model at ``step``.

    recall: {"a2v": {"r1", "r5", "r10", "avg"}, "v2a": {...}} in percent (recall_at_k).
    recon: masked reconstruction MSE (audio + video) on fixed masks; None if not measured.
    """

    step: int
    recall: dict[str, dict[str, float]]
    recon: float | None = None
    probes: int = 0


@torch.no_grad()
def reconstruction_loss(
    learner: Learner, batch: Batch, mask_seed: int = 0, chunk: int = 32
) -> float:
    """Masked reconstruction MSE (rec_a + rec_v, per-patch normalised) of a batch, no grad.

    Clip i's masks depend only on ``mask_seed`` and i, so the same probes get the same
    masks at every evaluation (also after more probes joined) and losses are comparable.
    """
    model = learner.model
    masks = fixed_masks(learner.model_cfg, len(batch), mask_seed)
    was_training, total = model.training, 0.0
    model.eval()
    try:
        for start in range(0, len(batch), chunk):
            part = _slice(batch, start, chunk).to(learner.device)
            idx = [m[start : start + chunk].to(learner.device) for m in masks]
            with learner.autocast():
                out = model.mae_loss(part.fbank, part.frames, *idx)
            total += float(out.loss_rec_a + out.loss_rec_v) * len(part)
    finally:
        model.train(was_training)
    return total / len(batch)


def fixed_masks(cfg: ModelConfig, batch: int, seed: int) -> list[Tensor]:
    """[vis_a, tgt_a, vis_v, tgt_v] plain MAE splits (B, K) on the CPU; row i from (seed, i)."""
    la, lv = cfg.num_audio_tokens, cfg.num_video_tokens
    rows = []
    for i in range(batch):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        rows.append(
            [
                *random_split(1, la, cfg.n_visible(la), gen, "cpu"),
                *random_split(1, lv, cfg.n_visible(lv), gen, "cpu"),
            ]
        )
    return [torch.cat(parts) for parts in zip(*rows, strict=True)]


def _slice(batch: Batch, start: int, size: int) -> Batch:
    return Batch(batch.fbank[start : start + size], batch.frames[start : start + size])


def embed_chunked(learner: Learner, batch: Batch, chunk: int = 32) -> tuple[Tensor, Tensor]:
    """learner.embed over chunks of ``chunk`` clips: (a (B, D), v (B, D)) on the CPU."""
    parts = [learner.embed(_slice(batch, s, chunk)) for s in range(0, len(batch), chunk)]
    return torch.cat([a.cpu() for a, _ in parts]), torch.cat([v.cpu() for _, v in parts])


def evaluate_probes(
    learner: Learner,
    batch: Batch,
    step: int,
    ks: tuple[int, ...] = (1, 5, 10),
    with_recon: bool = True,
    mask_seed: int = 0,
    embeddings: tuple[Tensor, Tensor] | None = None,
) -> ProbeEvaluation:
    """Retrieval R@K (both directions) and reconstruction loss of probes (B >= 2).

    ``embeddings``: the batch's (a (B, D), v (B, D)) by this learner, when the caller has
    them already (``embed_chunked``); else they are computed here."""
    if len(batch) < 2:
        raise ValueError(f"retrieval needs at least 2 probes, got {len(batch)}")
    emb_a, emb_v = embed_chunked(learner, batch) if embeddings is None else embeddings
    recon = reconstruction_loss(learner, batch, mask_seed) if with_recon else None
    return ProbeEvaluation(step, recall_at_k(emb_a, emb_v, ks), recon, len(batch))


# ---------------------------------------------------------------------------------------
# forgetting


@dataclass
class WindowState:
    """One window's current, best-so-far and forgetting (best - current), in percent."""

    evaluations: int
    step: int  # step of the latest evaluation
    current: dict[str, dict[str, float]]
    best: dict[str, dict[str, float]]
    forgetting: dict[str, dict[str, float]]
    recon: float | None = None  # latest reconstruction loss
    recon_best: float | None = None  # lowest so far
    recon_increase: float | None = None  # latest minus lowest (the loss's "forgetting")


@dataclass
class Averages:
    """Means over windows of current recall and of forgetting, per direction and metric."""

    windows: list[str] = field(default_factory=list)
    recall: dict[str, dict[str, float]] = field(default_factory=dict)
    forgetting: dict[str, dict[str, float]] = field(default_factory=dict)


Table = dict[str, dict[str, float]]  # {"a2v": {"r1": ..., "avg": ...}, "v2a": {...}}


@dataclass
class _Record:
    """One window's evaluations: the last ``keep`` in full, best and count over all."""

    history: deque[ProbeEvaluation]
    evaluations: int = 0
    best: Table = field(default_factory=dict)  # elementwise max of every recall so far
    recon_best: float | None = None  # lowest reconstruction loss so far

    def add(self, evaluation: ProbeEvaluation) -> None:
        self.history.append(evaluation)
        self.evaluations += 1
        self.best = _elementwise_max([t for t in (self.best, evaluation.recall) if t])
        recons = [r for r in (self.recon_best, evaluation.recon) if r is not None]
        self.recon_best = min(recons) if recons else None


class ForgettingTracker:
    """Per window: the best-so-far recall, the forgetting, and the last ``keep`` evaluations.

    Best-so-far and the lowest reconstruction loss are running values over every
    evaluation, so a long run's memory (and checkpoint) stays bounded by ``keep``.
    """

    def __init__(self, keep: int = 100) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.keep = keep
        self._records: dict[str, _Record] = {}

    def record(self, window: str, evaluation: ProbeEvaluation) -> None:
        if window not in self._records:
            self._records[window] = _Record(deque(maxlen=self.keep))
        self._records[window].add(evaluation)

    def drop(self, window: str) -> None:
        self._records.pop(window, None)

    def windows(self) -> list[str]:
        return list(self._records)

    def history(self, window: str) -> list[ProbeEvaluation]:
        """The last ``keep`` evaluations of ``window``, oldest first."""
        record = self._records.get(window)
        return list(record.history) if record else []

    def state(self, window: str) -> WindowState:
        """Current, best and forgetting of one window (KeyError if never evaluated)."""
        record = self._records[window]
        latest = record.history[-1]
        increase = None
        if latest.recon is not None and record.recon_best is not None:
            increase = latest.recon - record.recon_best
        return WindowState(
            evaluations=record.evaluations,
            step=latest.step,
            current=latest.recall,
            best=record.best,
            forgetting=_difference(record.best, latest.recall),
            recon=latest.recon,
            recon_best=record.recon_best,
            recon_increase=increase,
        )

    def averages(self, exclude: set[str] | frozenset[str] = frozenset()) -> Averages:
        """Means over the evaluated windows not in ``exclude`` (e.g. the one being learned)."""
        names = [w for w in self._records if w not in exclude]
        states = [self.state(w) for w in names]
        if not states:
            return Averages()
        return Averages(
            names,
            _elementwise_mean([s.current for s in states]),
            _elementwise_mean([s.forgetting for s in states]),
        )

    def summary(self, exclude: set[str] | frozenset[str] = frozenset()) -> dict:
        """JSON-ready: every window's state and the averages over the non-excluded ones."""
        return {
            "windows": {w: asdict(self.state(w)) for w in self._records},
            "average": asdict(self.averages(exclude)),
            "excluded": sorted(exclude),
        }

    def state_dict(self) -> dict[str, dict]:
        """{window: {"evaluations", "best", "recon_best", "history": [ProbeEvaluation dicts]}},
        plain numbers only; windows in insertion order."""
        return {
            name: {
                "evaluations": r.evaluations,
                "best": r.best,
                "recon_best": r.recon_best,
                "history": [asdict(e) for e in r.history],
            }
            for name, r in self._records.items()
        }

    def load_state_dict(self, state: dict[str, dict]) -> None:
        self._records = {}
        for name, saved in state.items():
            history = deque((ProbeEvaluation(**e) for e in saved["history"]), maxlen=self.keep)
            if history:
                self._records[name] = _Record(
                    history, int(saved["evaluations"]), saved["best"], saved["recon_best"]
                )


def _elementwise_max(tables: list[Table]) -> Table:
    return {d: {m: max(t[d][m] for t in tables) for m in tables[-1][d]} for d in tables[-1]}


def _elementwise_mean(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    first = tables[0]
    return {d: {m: statistics.fmean(t[d][m] for t in tables) for m in first[d]} for d in first}


def _difference(
    a: dict[str, dict[str, float]], b: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    return {d: {m: a[d][m] - b[d][m] for m in a[d]} for d in a}


# ---------------------------------------------------------------------------------------
# cross-version retrieval (compatible spaces)

MAX_LAG = 16  # a gallery comes from at most this many evaluations back
MAX_LAGS = 4  # lags tracked at once (gauge series: windows x 2 directions x lags)


def check_lags(lags: Sequence[int]) -> tuple[int, ...]:
    """The lags sorted and distinct; each 0..MAX_LAG, at most MAX_LAGS (ValueError else).

    Lag 0 compares an evaluation with itself (ratio 1 wherever defined): a self-check."""
    out = tuple(sorted({int(k) for k in lags}))
    if len(out) > MAX_LAGS or any(not 0 <= k <= MAX_LAG for k in out):
        raise ValueError(f"need at most {MAX_LAGS} lags in 0..{MAX_LAG}, got {tuple(lags)}")
    return out


@dataclass(frozen=True)
class ProbeEmbeddings:
    """One evaluation of a window's probes: their embeddings and the version that made them."""

    version: str
    step: int
    audio: Tensor  # (P, D) float16, in probe order
    video: Tensor  # (P, D) float16


@dataclass
class CrossVersion:
    """Cross-version R@1 of one window at one lag, in percent, per direction "a2v" / "v2a".

    Queries: the probes embedded by ``query_version`` (the latest evaluation); gallery: the
    same probes embedded ``lag`` evaluations earlier by ``gallery_version`` (a2v: audio
    queries against the old video embeddings; v2a the reverse). ``same``: R@1 with both
    sides by ``query_version``, on the same ``probes`` clips (the first ones: a window's
    probes only ever grow). ``ratio`` = cross / same, None where same is 0 (undefined).
    ``chance``: R@1 of a random ranking, 100 / probes.
    """

    lag: int
    query_version: str
    gallery_version: str
    query_step: int
    gallery_step: int
    updates_apart: int | None  # N of query_version minus N of gallery_version
    probes: int
    chance: float
    same: dict[str, float]
    cross: dict[str, float]
    ratio: dict[str, float | None]


def cross_version(now: ProbeEmbeddings, then: ProbeEmbeddings, lag: int) -> CrossVersion | None:
    """R@1 of ``now``'s probes as queries against ``then``'s as the gallery, and against
    ``now``'s own; None when fewer than 2 probes are common to both."""
    m = min(now.audio.shape[0], then.audio.shape[0])
    if m < 2:
        return None
    a, v = now.audio[:m], now.video[:m]
    same = {"a2v": _r1(a, v), "v2a": _r1(v, a)}
    cross = {"a2v": _r1(a, then.video[:m]), "v2a": _r1(v, then.audio[:m])}
    n_now, n_then = _updates(now.version), _updates(then.version)
    return CrossVersion(
        lag=lag,
        query_version=now.version,
        gallery_version=then.version,
        query_step=now.step,
        gallery_step=then.step,
        updates_apart=None if n_now is None or n_then is None else n_now - n_then,
        probes=m,
        chance=100.0 / m,
        same=same,
        cross=cross,
        ratio={d: cross[d] / same[d] if same[d] > 0 else None for d in same},
    )


def _r1(queries: Tensor, gallery: Tensor) -> float:
    return recall_against(queries, gallery, (1,))["r1"]


def _updates(version: str) -> int | None:
    """N of a version "G.N" (a bare "N" reads as generation 0); None if it is neither."""
    tail = str(version).rsplit(".", 1)[-1]
    return int(tail) if tail.isdigit() else None


class CompatibilityTracker:
    """Per window: the probe embeddings of its last ``max(lags) + 1`` evaluations and the
    cross-version R@1 of the latest against each lag's (``CrossVersion``).

    It reuses the embeddings the forgetting evaluation computes (no model pass of its own)
    and holds at most ``keep`` x P x D x 2 float16 values per window. No lags: disabled.
    """

    def __init__(self, lags: Sequence[int] = (1, 2, 4)) -> None:
        self.lags = check_lags(lags)
        self.keep = max(self.lags) + 1 if self.lags else 0
        self._history: dict[str, deque[ProbeEmbeddings]] = {}
        self._latest: dict[str, list[CrossVersion]] = {}

    def record(
        self, window: str, version: str, step: int, audio: Tensor, video: Tensor
    ) -> list[CrossVersion]:
        """Keep one evaluation's probe embeddings (a, v (P, D)) made by ``version``; returns
        the window's cross-version figures at every lag its history reaches."""
        if not self.keep:
            return []
        history = self._history.setdefault(window, deque(maxlen=self.keep))
        history.append(ProbeEmbeddings(str(version), step, _half(audio), _half(video)))
        self._latest[window] = _compare(history, self.lags)
        return self.report(window)

    def report(self, window: str) -> list[CrossVersion]:
        """The latest evaluation's figures, by lag ([] before a second evaluation)."""
        return list(self._latest.get(window, []))

    def history(self, window: str) -> list[ProbeEmbeddings]:
        """The kept evaluations of ``window``, oldest first."""
        return list(self._history.get(window, []))

    def windows(self) -> list[str]:
        return list(self._history)

    def drop(self, window: str) -> None:
        self._history.pop(window, None)
        self._latest.pop(window, None)

    def state_dict(self) -> dict[str, list[dict]]:
        """{window: [{"version", "step", "audio" (P, D) float16, "video"}]}, oldest first."""
        return {
            name: [
                {"version": e.version, "step": e.step, "audio": e.audio, "video": e.video}
                for e in history
            ]
            for name, history in self._history.items()
        }

    def load_state_dict(self, state: dict[str, list[dict]]) -> None:
        """Restore ``state_dict()`` (the newest ``keep`` evaluations of each window, as the
        lags may have shrunk since) and recompute the figures."""
        self._history, self._latest = {}, {}
        if not self.keep:
            return
        for name, saved in state.items():
            kept = [
                ProbeEmbeddings(
                    str(e["version"]), int(e["step"]), _half(e["audio"]), _half(e["video"])
                )
                for e in saved[-self.keep :]
            ]
            if kept:
                self._history[name] = deque(kept, maxlen=self.keep)
                self._latest[name] = _compare(self._history[name], self.lags)


def _half(x: Tensor) -> Tensor:
    return x.detach().cpu().half()


def _compare(history: deque[ProbeEmbeddings], lags: tuple[int, ...]) -> list[CrossVersion]:
    now = history[-1]
    out = []
    for lag in lags:
        if lag < len(history):
            figures = cross_version(now, history[-1 - lag], lag)
            if figures is not None:
                out.append(figures)
    return out
