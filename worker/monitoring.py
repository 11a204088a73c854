"""The worker's drift and forgetting monitors: feed them, export gauges, publish a summary.

``StreamMonitor.after_batch`` is called by the worker once per batch with the clips it just
embedded:

- training clips feed the drift monitor (embeddings + loudness/brightness, every batch) and
  define the *current window*: the clip's ``task`` tag, else a count window
  ``clips-<n // count_window>`` over untagged training clips;
- probe clips (purpose "probe": embedded, never trained on) are kept decoded, in float16 on
  the CPU, up to ``probes_per_window`` per window (their task tag, else the current window);
- every ``every`` steps every window's probes are re-embedded with the current learner:
  audio->video and video->audio R@1/5/10 and the masked reconstruction loss (fixed masks,
  no grad), recorded in a ``ForgettingTracker``;
- the same embeddings of the last few evaluations are kept with the version that made them
  (``CompatibilityTracker``): cross-version R@1, current-version queries against the gallery
  embedded ``lag`` evaluations earlier (``compat_lags``), and its ratio to same-version R@1;
- each drift report's per-modality z-score (MMD^2 against its permutation null) feeds a
  Page-Hinkley test (``ChangeDetector``): a rise is a change point, counted
  (``flava_drift_change_points_total``, Grafana's annotations) and kept in the summary;
- Prometheus gauges are set (``worker.telemetry``), and a JSON summary is written to
  ``Keys.monitor`` for the demo and operators.

At most ``max_windows`` windows are tracked (bounded label cardinality): a new one drops
the oldest, with its probes, history and gauge series.

The monitor survives restarts through the worker's checkpoint (``state_dict`` /
``load_state_dict``; tensors and plain containers only). Probe bytes are deleted on ack and a
re-posted probe is a duplicate, so the checkpoint is the only copy of the probe sets. It holds:

- per window, in order: the probe ids, their decoded inputs stacked as float16 tensors
  (fbank (P, T, F), frames (P, N, 3, S, S)), ``trained`` and the last drift report;
  P <= ``probes_per_window`` (later probes of a full window are refused, never swapped in,
  so a window's R@K history is always over the same clips) and at most ``max_windows``
  windows (a new one drops the oldest), so at most ``max_probes`` = their product probes:
  ``probe_bytes`` each, 280 KiB at the tiny preset, 1.4 MiB at base;
- the forgetting tracker: per window the evaluation count, best-so-far recall, lowest
  reconstruction loss and the last 100 evaluations;
- the compatibility tracker: per window the probe embeddings (float16) and versions of the
  last ``max(compat_lags) + 1`` evaluations: with the default lags (1, 2, 4) 5 x P x D x 2
  values per window, at 64 probes 240 KiB at tiny (D 192), 960 KiB at base (D 768);
- the drift windows (float32 embeddings and input statistics, 2 x ``drift.window`` rows per
  series), the permutations' generator state and the last drift report, the Page-Hinkley
  tests and the last change points, the current window and the counters.

A restored monitor exports its gauges and reports the same figures as before the restart.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import redis
import torch
from prometheus_client import Gauge
from torch import Tensor

from contract import wire
from worker import telemetry
from worker.core.changepoint import ChangeDetector, PageHinkleyConfig
from worker.core.learner import Batch, Learner
from worker.core.media import Clip
from worker.core.monitors import (
    CompatibilityTracker,
    DriftConfig,
    DriftMonitor,
    DriftReport,
    ForgettingTracker,
    ProbeEvaluation,
    check_lags,
    clip_brightness,
    clip_loudness,
    embed_chunked,
    evaluate_probes,
)
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)
DIRECTIONS = ("a2v", "v2a")
CROSS_VERSION_DEFINITION = (
    "R@1 (%) of a window's probes embedded by query_version against the same probes embedded "
    "by gallery_version, `lag` evaluations earlier; same: both by query_version on the same "
    "probes; ratio = cross / same (null when same is 0); chance = 100 / probes"
)


@dataclass(frozen=True)
class MonitorConfig:
    """How the stream monitor windows, keeps probes and evaluates (see WorkerSettings)."""

    drift: DriftConfig = field(default_factory=DriftConfig)
    change: PageHinkleyConfig = field(default_factory=PageHinkleyConfig)  # on drift z-scores
    rereference: bool = False  # restart the drift reference when the train task changes
    probes_per_window: int = 64  # held-out clips kept per window
    max_windows: int = 8  # windows tracked at once; the oldest is dropped
    count_window: int = 500  # untagged training clips per count window
    every: int = 25  # steps between forgetting evaluations; 0: never
    recon: bool = True  # measure the probes' reconstruction loss too
    ks: tuple[int, ...] = (1, 5, 10)  # recall cut-offs
    # cross-version R@1 against the gallery embedded this many evaluations back; () = off
    compat_lags: tuple[int, ...] = (1, 2, 4)

    def __post_init__(self) -> None:
        if self.max_windows < 2 or self.probes_per_window < 2 or self.count_window < 1:
            raise ValueError(f"need max_windows, probes_per_window >= 2, count_window >= 1: {self}")
        check_lags(self.compat_lags)

    @property
    def max_probes(self) -> int:
        """Most probes held (in memory and in a checkpoint), over every window."""
        return self.max_windows * self.probes_per_window

    @classmethod
    def from_settings(cls, s: WorkerSettings) -> MonitorConfig:
        drift = DriftConfig(
            window=s.monitor_window,
            min_samples=max(2, s.monitor_window // 4),
            alpha=s.monitor_drift_alpha,
            permutations=s.monitor_drift_permutations,
            seed=s.seed,
        )
        change = PageHinkleyConfig(s.monitor_change_delta, s.monitor_change_threshold)
        return cls(
            drift=drift,
            change=change,
            rereference=s.monitor_rereference,
            probes_per_window=s.monitor_probes_per_window,
            max_windows=s.monitor_max_windows,
            count_window=s.monitor_count_window,
            every=s.monitor_every,
            recon=s.monitor_recon,
            compat_lags=tuple(s.monitor_compat_lags),
        )


@dataclass
class ProbeSet:
    """One window's decoded probe clips, float16 on the CPU, in arrival order."""

    ids: list[str] = field(default_factory=list)
    fbank: list[Tensor] = field(default_factory=list)  # each (audio_frames, mel_bins)
    frames: list[Tensor] = field(default_factory=list)  # each (num_frames, 3, S, S)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, clip_id: str, clip: Clip, capacity: int) -> bool:
        """Keep the clip unless the set is full or already holds it."""
        if len(self) >= capacity or clip_id in self.ids:
            return False
        self.ids.append(clip_id)
        self.fbank.append(clip.fbank.detach().cpu().half())
        self.frames.append(clip.frames.detach().cpu().half())
        return True

    def batch(self) -> Batch:
        """All probes as a float32 Batch: fbank (P, T, F), frames (P, N, 3, S, S)."""
        return Batch(torch.stack(self.fbank).float(), torch.stack(self.frames).float(), self.ids)

    def state_dict(self) -> dict:
        """{"ids": [P str], "fbank": (P, T, F) float16, "frames": (P, N, 3, S, S) float16}."""
        if not self.ids:
            empty = torch.empty(0, dtype=torch.float16)
            return {"ids": [], "fbank": empty, "frames": empty}
        fbank, frames = torch.stack(self.fbank), torch.stack(self.frames)
        return {"ids": list(self.ids), "fbank": fbank, "frames": frames}

    @classmethod
    def from_state(cls, state: dict, capacity: int) -> ProbeSet:
        """The first ``capacity`` probes of a ``state_dict()``."""
        ids = list(state["ids"])[:capacity]
        fbank, frames = state["fbank"][: len(ids)].half(), state["frames"][: len(ids)].half()
        return cls(ids, list(fbank), list(frames))


def probe_bytes(fbank_shape: tuple[int, ...], frames_shape: tuple[int, ...]) -> int:
    """Bytes one probe takes (float16 fbank + frames), in memory and in a checkpoint."""
    return 2 * (torch.Size(fbank_shape).numel() + torch.Size(frames_shape).numel())


@dataclass
class Window:
    """What the monitor knows about one window (task tag or count window)."""

    probes: ProbeSet = field(default_factory=ProbeSet)
    trained: bool = False  # training clips of this window were seen
    drift: dict | None = None  # the last drift report while it was the current window

    def state_dict(self, name: str) -> dict:
        return {
            "name": name,
            "trained": self.trained,
            "drift": self.drift,
            **self.probes.state_dict(),
        }

    @classmethod
    def from_state(cls, state: dict, capacity: int) -> Window:
        return cls(ProbeSet.from_state(state, capacity), bool(state["trained"]), state["drift"])


class StreamMonitor:
    """Drift on every batch, forgetting every ``cfg.every`` steps; gauges and a summary."""

    def __init__(
        self,
        cfg: MonitorConfig,
        learner: Learner,
        client: redis.Redis | None = None,
        keys: wire.Keys | None = None,
    ) -> None:
        self.cfg = cfg
        self.learner = learner
        self.client = client
        self.keys = keys or wire.Keys()
        self.drift = DriftMonitor(cfg.drift)
        self.changes = ChangeDetector(cfg.change)
        _declare_change_series()
        self.tracker = ForgettingTracker()
        self.compat = CompatibilityTracker(cfg.compat_lags)
        self.windows: OrderedDict[str, Window] = OrderedDict()
        self.current: str | None = None  # window of the latest training clip
        self.untagged_clips = 0
        self.last_eval_step = 0
        self.last_report: DriftReport | None = None

    # ---- per batch -----------------------------------------------------------------------
    def after_batch(
        self,
        entries: list[wire.ClipEntry],
        clips: list[Clip],
        emb_a: Tensor,
        emb_v: Tensor,
        step: int,
        version: str,
    ) -> None:
        """Feed one embedded batch (row i of emb_a/emb_v (B, D) is clips[i]); maybe evaluate."""
        report = self.observe(entries, clips, emb_a, emb_v)
        if report is not None:
            self._detect_changes(report, step, version)
        if self.due(step):
            self.evaluate(step, version)
        self.publish(step, version)

    def observe(
        self, entries: list[wire.ClipEntry], clips: list[Clip], emb_a: Tensor, emb_v: Tensor
    ) -> DriftReport | None:
        """Training clips -> drift and the current window; probe clips -> their window.
        The drift report these clips made, if any.

        Clips whose embedding is not finite (the worker dead-letters them) are ignored.
        """
        finite = (torch.isfinite(emb_a).all(dim=1) & torch.isfinite(emb_v).all(dim=1)).tolist()
        train = [i for i, e in enumerate(entries) if e.purpose == "train" and finite[i]]
        for i in train:
            self._enter(self._train_window(entries[i]))
        report = None
        if train:
            report = self._update_drift([clips[i] for i in train], emb_a[train], emb_v[train])
        for entry, clip, ok in zip(entries, clips, finite, strict=True):
            if entry.purpose == "probe" and ok:
                self._keep_probe(entry, clip)
        telemetry.MONITOR_WINDOWS.set(len(self.windows))
        return report

    def _train_window(self, entry: wire.ClipEntry) -> str:
        if entry.task:
            return entry.task
        name = f"clips-{self.untagged_clips // self.cfg.count_window}"
        self.untagged_clips += 1
        return name

    def _enter(self, name: str) -> None:
        """Make ``name`` the current window (re-referencing drift if so configured)."""
        if name != self.current and self.current is not None and self.cfg.rereference:
            self.drift.rereference()
            self.changes.restart()  # the z-scores start again from a new reference
        self.current = name
        self._window(name).trained = True

    def _update_drift(self, clips: list[Clip], emb_a: Tensor, emb_v: Tensor) -> DriftReport | None:
        fbank = torch.stack([c.fbank for c in clips])
        frames = torch.stack([c.frames for c in clips])
        inputs = {"loudness": clip_loudness(fbank), "brightness": clip_brightness(frames)}
        self.drift.update({"audio": emb_a, "video": emb_v}, inputs)
        report = self.drift.report()
        ref_n, recent_n = self.drift.sizes()
        telemetry.DRIFT_WINDOW_CLIPS.labels("reference").set(ref_n)
        telemetry.DRIFT_WINDOW_CLIPS.labels("recent").set(recent_n)
        if report is not None and self.current is not None:
            self.last_report = report
            self._window(self.current).drift = report.as_dict()
            _export_drift(report)
        return report

    def _detect_changes(self, report: DriftReport, step: int, version: str) -> None:
        """Feed each modality's drift z-score to its Page-Hinkley test; export what it finds."""
        zscores = {m: d.zscore for m, d in report.modalities.items() if d.zscore is not None}
        for change in self.changes.update(zscores, step, version, time.time()):
            telemetry.DRIFT_CHANGE_POINTS.labels(change.series).inc()
            telemetry.DRIFT_LAST_CHANGE.labels(change.series).set(change.at)
            log.info(
                "drift change point: %s z-score rose to %.1f",
                change.series,
                change.value,
                extra={"step": step, "version": version, "modality": change.series},
            )

    def _keep_probe(self, entry: wire.ClipEntry, clip: Clip) -> None:
        name = entry.task or self.current or "clips-0"
        window = self._window(name)
        if window.probes.add(entry.clip_id, clip, self.cfg.probes_per_window):
            telemetry.PROBE_CLIPS.labels(name).set(len(window.probes))
        else:
            log.debug("probe %s not kept: window %s is full or has it", entry.clip_id, name)

    def _window(self, name: str) -> Window:
        """The window called ``name``, created (and the oldest dropped) if new."""
        if name not in self.windows:
            self.windows[name] = Window()
            while len(self.windows) > self.cfg.max_windows:
                self._drop(next(w for w in self.windows if w not in (name, self.current)))
        return self.windows[name]

    def _drop(self, name: str) -> None:
        log.info("monitor window %s dropped (more than %d windows)", name, self.cfg.max_windows)
        del self.windows[name]
        self.tracker.drop(name)
        self.compat.drop(name)
        _remove_window_series(name, self.cfg.ks, self.cfg.compat_lags)

    # ---- forgetting ------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        """Whether ``every`` steps passed since the last evaluation and probes exist."""
        if self.cfg.every <= 0 or step - self.last_eval_step < self.cfg.every:
            return False
        return self._has_probes()

    def _has_probes(self) -> bool:
        return any(len(w.probes) >= 2 for w in self.windows.values())

    def catch_up(self, step: int, version: str) -> bool:
        """When the stream is idle: evaluate if the model changed since the last evaluation,
        so the published figures describe the model as it is now."""
        if self.cfg.every <= 0 or step == self.last_eval_step or not self._has_probes():
            return False
        self.evaluate(step, version)
        self.publish(step, version)
        return True

    def evaluate(self, step: int, version: str) -> dict[str, ProbeEvaluation]:
        """Re-embed every window's probes with the current model (``version``); update the
        trackers and gauges. The embeddings serve both the recall and the cross-version
        figures: one model pass per probe (and one more for the reconstruction loss)."""
        started = time.perf_counter()
        results = {}
        for name, window in self.windows.items():
            if len(window.probes) >= 2:
                batch = window.probes.batch()
                emb = embed_chunked(self.learner, batch)
                results[name] = evaluate_probes(
                    self.learner, batch, step, self.cfg.ks, self.cfg.recon, embeddings=emb
                )
                self.tracker.record(name, results[name])
                self.compat.record(name, version, step, *emb)
                self._export_window(name)
                self._export_cross_version(name)
        self._export_averages()
        self.last_eval_step = step
        telemetry.MONITOR_SECONDS.observe(time.perf_counter() - started)
        telemetry.MONITOR_EVALUATIONS.inc()
        log.info(
            "forgetting evaluation at step %d over %d windows",
            step,
            len(results),
            extra={"step": step, "version": version},
        )
        return results

    def past_windows(self) -> set[str]:
        """Windows trained on before the current one: the ones forgetting is averaged over."""
        return {n for n, w in self.windows.items() if w.trained and n != self.current}

    def _export_window(self, name: str) -> None:
        state = self.tracker.state(name)
        for direction, metric, k in _series(self.cfg.ks):
            telemetry.PROBE_RECALL.labels(name, direction, k).set(
                state.current[direction][metric] / 100
            )
            telemetry.FORGETTING.labels(name, direction, k).set(
                state.forgetting[direction][metric] / 100
            )
        if state.recon is not None:
            telemetry.PROBE_RECON_LOSS.labels(name).set(state.recon)

    def _export_cross_version(self, name: str) -> None:
        for c in self.compat.report(name):
            lag = str(c.lag)
            for d in DIRECTIONS:
                ratio = c.ratio[d]
                telemetry.CROSS_VERSION_RECALL.labels(name, d, lag).set(c.cross[d] / 100)
                telemetry.CROSS_VERSION_RELATIVE.labels(name, d, lag).set(
                    math.nan if ratio is None else ratio
                )
            if c.updates_apart is not None:
                telemetry.CROSS_VERSION_UPDATES.labels(name, lag).set(c.updates_apart)

    def _export_averages(self) -> None:
        trained = {n for n, w in self.windows.items() if w.trained}
        recall = self.tracker.averages(exclude=set(self.windows) - trained).recall
        forgetting = self.tracker.averages(exclude=set(self.windows) - self.past_windows())
        for direction, metric, k in _series(self.cfg.ks):
            if recall:
                telemetry.PROBE_RECALL_AVG.labels(direction, k).set(recall[direction][metric] / 100)
            if forgetting.forgetting:
                telemetry.FORGETTING_AVG.labels(direction, k).set(
                    forgetting.forgetting[direction][metric] / 100
                )

    # ---- checkpoint ------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What the monitor needs to report the same figures after a restart (module doc)."""
        return {
            "windows": [w.state_dict(name) for name, w in self.windows.items()],
            "tracker": self.tracker.state_dict(),
            "compat": self.compat.state_dict(),
            "drift": self.drift.state_dict(),
            "changes": self.changes.state_dict(),
            "last_report": self.last_report.as_dict() if self.last_report else None,
            "current": self.current,
            "untagged_clips": self.untagged_clips,
            "last_eval_step": self.last_eval_step,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()``, then export the gauges."""
        self._load_windows(state["windows"])
        tracked = {n: t for n, t in state["tracker"].items() if n in self.windows}
        self.tracker.load_state_dict(tracked)
        kept = state.get("compat", {})  # none in checkpoints older than cross-version figures
        self.compat.load_state_dict({n: h for n, h in kept.items() if n in self.windows})
        self.drift.load_state_dict(state["drift"])
        if "changes" in state:  # absent from checkpoints older than the change-point test
            self.changes.load_state_dict(state["changes"])
        report = state["last_report"]
        self.last_report = DriftReport.from_dict(report) if report else None
        self.current = state["current"]
        self.untagged_clips = int(state["untagged_clips"])
        self.last_eval_step = int(state["last_eval_step"])
        self.export()

    def _load_windows(self, saved: list[dict]) -> None:
        """Within this config's bounds: the newest ``max_windows`` windows, the first
        ``probes_per_window`` probes of each (settings may have shrunk since the save)."""
        cap = self.cfg.probes_per_window
        kept = saved[-self.cfg.max_windows :]
        if len(kept) < len(saved) or any(len(w["ids"]) > cap for w in kept):
            log.warning("monitor state cut to %d windows x %d probes", len(kept), cap)
        self.windows = OrderedDict((w["name"], Window.from_state(w, cap)) for w in kept)

    def export(self) -> None:
        """Set every gauge from the state held (after a restore: nothing else would)."""
        telemetry.MONITOR_WINDOWS.set(len(self.windows))
        for name, window in self.windows.items():
            telemetry.PROBE_CLIPS.labels(name).set(len(window.probes))
        for name in self.tracker.windows():
            self._export_window(name)
        for name in self.compat.windows():
            self._export_cross_version(name)
        self._export_averages()
        ref_n, recent_n = self.drift.sizes()
        telemetry.DRIFT_WINDOW_CLIPS.labels("reference").set(ref_n)
        telemetry.DRIFT_WINDOW_CLIPS.labels("recent").set(recent_n)
        if self.last_report is not None:
            _export_drift(self.last_report)
        for modality, change in self.changes.last().items():
            telemetry.DRIFT_LAST_CHANGE.labels(modality).set(change.at)
        _declare_change_series()

    # ---- summary ---------------------------------------------------------------------------
    def summary(self, step: int, version: str) -> dict:
        """JSON-ready state: drift now, and per window drift, probes and forgetting (in %)."""
        tracked = set(self.tracker.windows())
        past = self.past_windows() & tracked
        return {
            "step": step,
            "version": version,
            "updated_at": time.time(),
            "current_window": self.current,
            "last_evaluation_step": self.last_eval_step,
            "drift": self.last_report.as_dict() if self.last_report else None,
            "change_points": self._change_summary(),
            "windows": {
                name: {
                    "probes": len(w.probes),
                    "trained": w.trained,
                    "drift": w.drift,
                    "retrieval": asdict(self.tracker.state(name)) if name in tracked else None,
                    "cross_version": [asdict(c) for c in self.compat.report(name)],
                }
                for name, w in self.windows.items()
            },
            "average_forgetting": asdict(self.tracker.averages(exclude=tracked - past)),
            "cross_version": {
                "lags": list(self.cfg.compat_lags),
                "definition": CROSS_VERSION_DEFINITION,
            },
            "recon": "masked MSE, audio + video, fixed masks" if self.cfg.recon else "off",
        }

    def _change_summary(self) -> dict:
        """Counts and the last change points of the drift z-scores, with the test's knobs."""
        return {
            "test": {"page_hinkley": asdict(self.cfg.change), "series": "drift z-score"},
            "counts": dict(self.changes.counts),
            "recent": [asdict(c) for c in self.changes.recent],
        }

    def publish(self, step: int, version: str) -> None:
        """Write the summary to ``Keys.monitor`` (best effort: a Redis error is logged)."""
        if self.client is None:
            return
        try:
            self.client.set(self.keys.monitor, json.dumps(self.summary(step, version)))
        except redis.RedisError as exc:
            telemetry.REDIS_ERRORS.inc()
            log.warning("monitor summary not published: %s", exc)


def _series(ks: tuple[int, ...]) -> list[tuple[str, str, str]]:
    """(direction, recall_at_k metric name, k label) for every exported series."""
    pairs = [(f"r{k}", str(k)) for k in ks] + [("avg", "avg")]
    return [(d, metric, k) for d in DIRECTIONS for metric, k in pairs]


def _export_drift(report: DriftReport) -> None:
    for modality, drift in report.modalities.items():
        telemetry.DRIFT_MMD2.labels(modality).set(drift.mmd2)
        telemetry.DRIFT_MEAN_SHIFT.labels(modality).set(drift.mean_shift)
        if drift.pvalue is not None:  # None: a report restored from before the test
            threshold = math.inf if drift.threshold is None else drift.threshold
            telemetry.DRIFT_MMD2_THRESHOLD.labels(modality).set(threshold)
            telemetry.DRIFT_PVALUE.labels(modality).set(drift.pvalue)
            telemetry.DRIFT_ZSCORE.labels(modality).set(drift.zscore or 0.0)
    for name, stat in report.inputs.items():
        telemetry.DRIFT_INPUT_ZSCORE.labels(name).set(stat.zscore)
    telemetry.INPUT_LOUDNESS.set(report.inputs["loudness"].recent)
    telemetry.INPUT_BRIGHTNESS.set(report.inputs["brightness"].recent)


def _declare_change_series() -> None:
    """The change-point counters exist (at 0) from the start, so rate() and panels see them."""
    for modality in ("audio", "video"):
        telemetry.DRIFT_CHANGE_POINTS.labels(modality)


def _remove_window_series(name: str, ks: tuple[int, ...], lags: tuple[int, ...]) -> None:
    """Remove a dropped window's labelled series, so label cardinality stays bounded."""
    removals: list[tuple[Gauge, tuple[str, ...]]] = [
        (telemetry.PROBE_CLIPS, (name,)),
        (telemetry.PROBE_RECON_LOSS, (name,)),
    ]
    for direction, _, k in _series(ks):
        removals += [(telemetry.PROBE_RECALL, (name, direction, k))]
        removals += [(telemetry.FORGETTING, (name, direction, k))]
    for lag in map(str, lags):
        removals += [(telemetry.CROSS_VERSION_UPDATES, (name, lag))]
        for direction in DIRECTIONS:
            removals += [(telemetry.CROSS_VERSION_RECALL, (name, direction, lag))]
            removals += [(telemetry.CROSS_VERSION_RELATIVE, (name, direction, lag))]
    for gauge, labels in removals:
        try:
            gauge.remove(*labels)
        except KeyError:
            pass  # never set


def format_summary(summary: dict) -> list[str]:
    """Human-readable lines of a ``summary()`` (the demo prints them per segment)."""
    lines = [
        f"{'window':<16}{'probes':>7}{'MMD2 a/v':>16}{'shift a/v':>14}"
        f"{'R@1 a2v now/best':>19}{'forget a2v avg':>16}{'recon':>8}"
    ]
    for name, w in summary["windows"].items():
        lines.append(f"{name:<16}{w['probes']:>7}{_drift_cells(w['drift'])}{_recall_cells(w)}")
    for name, w in summary["windows"].items():
        if w.get("cross_version"):
            lines.append(_cross_version_line(name, w["cross_version"]))
    avg = summary["average_forgetting"]
    if avg["forgetting"]:
        f = avg["forgetting"]
        lines.append(
            f"average forgetting over {', '.join(avg['windows'])}: a2v avg "
            f"{f['a2v']['avg']:.1f}, v2a avg {f['v2a']['avg']:.1f} (%-points)"
        )
    return lines


def _drift_cells(drift: dict | None) -> str:
    if not drift:
        return f"{'-':>16}{'-':>14}"
    m = drift["modalities"]
    mmd = f"{m['audio']['mmd2']:.3f}/{m['video']['mmd2']:.3f}"
    shift = f"{m['audio']['mean_shift']:.2f}/{m['video']['mean_shift']:.2f}"
    return f"{mmd:>16}{shift:>14}"


def _recall_cells(window: dict) -> str:
    r = window["retrieval"]
    if not r:
        return f"{'-':>19}{'-':>16}{'-':>8}"
    now_best = f"{r['current']['a2v']['r1']:.1f}/{r['best']['a2v']['r1']:.1f}"
    recon = f"{r['recon']:.3f}" if r["recon"] is not None else "-"
    return f"{now_best:>19}{r['forgetting']['a2v']['avg']:>16.1f}{recon:>8}"


def _cross_version_line(name: str, figures: list[dict]) -> str:
    """One window's cross-version R@1 ratios (a2v/v2a) at each lag, with the R@1 chance."""

    def ratio(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    cells = [
        f"{c['lag']} back ({c['gallery_version']}): "
        f"{ratio(c['ratio']['a2v'])}/{ratio(c['ratio']['v2a'])}"
        for c in figures
    ]
    chance = figures[0]["chance"]
    return (
        f"{name}: cross-version R@1 / same-version R@1, a2v/v2a, gallery k evaluations "
        f"back: {'; '.join(cells)} (R@1 chance {chance:.1f}%)"
    )
