"""The stream monitor with the real tiny learner on real decoded clips, and a real Redis."""

from __future__ import annotations

import hashlib
import io
import json
import uuid

import pytest
import redis
import torch
from prometheus_client import REGISTRY

from contract import wire
from tests.queueing import enqueue
from worker import telemetry
from worker.core.learner import Batch, build_learner
from worker.core.media import decode_clip
from worker.core.model import preset
from worker.core.monitors import DriftConfig
from worker.core.synthetic import StreamConfig, make_clip, segment_specs
from worker.monitoring import MonitorConfig, StreamMonitor, format_summary, probe_bytes
from worker.runner import Worker

STREAM = StreamConfig(num_segments=2)


@pytest.fixture(scope="module")
def media() -> dict[str, list[tuple[bytes, object]]]:
    """(mp4 bytes, decoded Clip) per kind: train0, probe0, train1, probe1."""
    cfg = preset("tiny").media()
    specs = {
        "train0": segment_specs(STREAM, 0, 6, seed=3),
        "probe0": segment_specs(STREAM, 0, 4, seed=3, split="heldout"),
        "train1": segment_specs(STREAM, 1, 6, seed=3),
        "probe1": segment_specs(STREAM, 1, 4, seed=3, split="heldout"),
    }
    out = {}
    for kind, kind_specs in specs.items():
        data = [make_clip(s, STREAM) for s in kind_specs]
        out[kind] = [(d, decode_clip(d, cfg)) for d in data]
    return out


@pytest.fixture(scope="module")
def learner():
    return build_learner("finetune", preset("tiny"))


def monitor_cfg(**overrides) -> MonitorConfig:
    base = {"drift": DriftConfig(window=4, min_samples=2), "every": 0, "probes_per_window": 8}
    return MonitorConfig(**{**base, **overrides})


def entries_of(items, task: str, purpose: str) -> list[wire.ClipEntry]:
    return [
        wire.ClipEntry(hashlib.sha256(data).hexdigest(), len(data), "video/mp4", task, purpose)
        for data, _ in items
    ]


def feed(monitor: StreamMonitor, learner, items, task: str, purpose: str, step: int) -> None:
    """What the worker does after its update: embed the batch, hand it to the monitor.

    (The learner does not learn here, to keep the tests short: the worker test below does.)
    """
    clips = [c for _, c in items]
    batch = Batch(torch.stack([c.fbank for c in clips]), torch.stack([c.frames for c in clips]))
    emb_a, emb_v = learner.embed(batch)
    monitor.after_batch(entries_of(items, task, purpose), clips, emb_a, emb_v, step, step)


def gauge(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def names() -> tuple[str, str]:
    tag = uuid.uuid4().hex[:6]
    return f"seg0-{tag}", f"seg1-{tag}"


def run_two_segments(monitor, learner, media, w0, w1) -> None:
    feed(monitor, learner, media["probe0"], w0, "probe", 0)
    feed(monitor, learner, media["probe1"], w1, "probe", 0)
    feed(monitor, learner, media["train0"][:3], w0, "train", 1)
    feed(monitor, learner, media["train0"][3:], w0, "train", 2)
    feed(monitor, learner, media["train1"][:3], w1, "train", 3)
    feed(monitor, learner, media["train1"][3:], w1, "train", 4)


def test_train_clips_feed_drift_and_probes_are_kept_per_task(learner, media):
    w0, w1 = names()
    monitor = StreamMonitor(monitor_cfg(), learner)
    run_two_segments(monitor, learner, media, w0, w1)
    assert list(monitor.windows) == [w0, w1] and monitor.current == w1
    assert [len(w.probes) for w in monitor.windows.values()] == [4, 4]
    assert all(w.trained for w in monitor.windows.values())
    report = monitor.last_report
    assert report is not None and (report.reference_size, report.recent_size) == (4, 4)
    assert gauge("flava_drift_mmd2", modality="audio") == report.modalities["audio"].mmd2
    assert (
        gauge("flava_drift_mean_shift", modality="video") == report.modalities["video"].mean_shift
    )
    assert gauge("flava_input_brightness") == report.inputs["brightness"].recent
    assert 0.0 < gauge("flava_input_brightness") < 1.0
    assert gauge("flava_probe_clips", window=w1) == 4
    assert monitor.windows[w0].drift is not None  # drift recorded while w0 was current
    assert monitor.tracker.windows() == []  # every=0: no evaluation


def test_probes_are_evaluated_every_n_steps_and_never_trained(learner, media):
    w0, w1 = names()
    monitor = StreamMonitor(monitor_cfg(every=2), learner)
    before = {k: v.clone() for k, v in learner.model.state_dict().items()}
    run_two_segments(monitor, learner, media, w0, w1)
    after = learner.model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())  # evaluation never trains
    assert [e.step for e in monitor.tracker.history(w0)] == [2, 4]
    state = monitor.tracker.state(w0)
    assert gauge("flava_probe_recall_ratio", window=w0, direction="a2v", k="1") == pytest.approx(
        state.current["a2v"]["r1"] / 100
    )
    assert gauge("flava_forgetting_ratio", window=w0, direction="v2a", k="avg") == pytest.approx(
        state.forgetting["v2a"]["avg"] / 100
    )
    assert gauge("flava_probe_reconstruction_loss", window=w1) == pytest.approx(
        monitor.tracker.state(w1).recon
    )
    # the average forgetting covers past windows only: w1 is being learned
    assert monitor.past_windows() == {w0}
    assert gauge("flava_forgetting_avg_ratio", direction="a2v", k="avg") == pytest.approx(
        state.forgetting["a2v"]["avg"] / 100
    )
    assert not monitor.due(5) and monitor.due(6)


def test_probe_windows_are_bounded_and_deduplicated(learner, media):
    w0, _ = names()
    monitor = StreamMonitor(monitor_cfg(probes_per_window=3), learner)
    feed(monitor, learner, media["probe0"][:2], w0, "probe", 0)
    feed(monitor, learner, media["probe0"][:2], w0, "probe", 0)  # redelivered: kept once
    assert len(monitor.windows[w0].probes) == 2
    feed(monitor, learner, media["probe0"], w0, "probe", 0)
    assert len(monitor.windows[w0].probes) == 3
    assert monitor.windows[w0].probes.batch().fbank.dtype == torch.float32


def test_untagged_training_clips_are_windowed_by_count(learner, media):
    monitor = StreamMonitor(monitor_cfg(count_window=4), learner)
    feed(monitor, learner, media["train0"], "", "train", 1)
    feed(monitor, learner, media["train1"][:3], "", "train", 2)
    assert list(monitor.windows) == ["clips-0", "clips-1", "clips-2"]
    assert monitor.current == "clips-2"
    feed(monitor, learner, media["probe0"][:2], "", "probe", 2)  # untagged probes: current
    assert len(monitor.windows["clips-2"].probes) == 2


def test_oldest_window_is_dropped_with_its_series(learner, media):
    tag = uuid.uuid4().hex[:6]
    monitor = StreamMonitor(monitor_cfg(max_windows=2, every=1), learner)
    for i, kind in enumerate(["probe0", "probe1", "probe0"]):
        feed(monitor, learner, media[kind][i : i + 2], f"w{i}-{tag}", "probe", 0)
    feed(monitor, learner, media["train0"][:2], f"w2-{tag}", "train", 1)  # evaluates
    assert list(monitor.windows) == [f"w1-{tag}", f"w2-{tag}"]
    assert gauge("flava_probe_clips", window=f"w0-{tag}") is None
    feed(monitor, learner, media["probe1"][2:4], f"w3-{tag}", "probe", 1)
    assert list(monitor.windows) == [f"w2-{tag}", f"w3-{tag}"]  # the current one stays
    assert gauge("flava_probe_recall_ratio", window=f"w1-{tag}", direction="a2v", k="1") is None
    assert f"w1-{tag}" not in monitor.tracker.windows()


def test_clips_with_non_finite_embeddings_are_ignored(learner, media):
    w0, _ = names()
    monitor = StreamMonitor(monitor_cfg(), learner)
    items = media["probe0"][:3]
    clips = [c for _, c in items]
    emb = torch.zeros(3, learner.model_cfg.dim)
    emb[1, 0] = float("nan")
    monitor.after_batch(entries_of(items, w0, "probe"), clips, emb, emb.clone(), 0, 0)
    assert len(monitor.windows[w0].probes) == 2


def test_summary_is_published_to_redis(learner, media, redis_url, prefix):
    client = redis.Redis.from_url(redis_url)
    w0, w1 = names()
    monitor = StreamMonitor(monitor_cfg(every=2), learner, client, wire.Keys(prefix))
    try:
        run_two_segments(monitor, learner, media, w0, w1)
        summary = json.loads(client.get(wire.Keys(prefix).monitor))
    finally:
        client.close()
    assert summary["step"] == 4 and summary["current_window"] == w1
    assert set(summary["windows"]) == {w0, w1}
    assert summary["windows"][w0]["retrieval"]["evaluations"] == 2
    assert summary["average_forgetting"]["windows"] == [w0]
    assert summary["drift"]["modalities"]["audio"]["mmd2"] == pytest.approx(
        monitor.last_report.modalities["audio"].mmd2
    )
    lines = format_summary(summary)
    assert any(line.startswith(w0) for line in lines) and "average forgetting" in lines[-1]


# ---- wired into the worker -----------------------------------------------------------------


def test_worker_feeds_the_monitor_and_publishes_its_summary(
    media, redis_url, prefix, worker_settings
):
    settings = worker_settings(
        monitor_window=4,
        monitor_every=1,
    )
    client = redis.Redis.from_url(redis_url)
    keys = wire.Keys(prefix)
    for data, _ in media["probe0"]:
        enqueue(client, keys, data, "probe", "segment-0")
    for data, _ in media["train0"][:4]:
        enqueue(client, keys, data, "train", "segment-0")
    worker = Worker(settings, client)
    worker.start()
    try:
        worker.iterate()  # the probes: no step
        worker.iterate()  # four training clips: step 1, evaluation
        summary = json.loads(client.get(keys.monitor))
    finally:
        worker.pool.shutdown()
        client.close()
    assert summary["step"] == 1 and summary["current_window"] == "segment-0"
    window = summary["windows"]["segment-0"]
    assert window["probes"] == 4 and window["trained"] is True
    assert window["retrieval"]["evaluations"] == 1 and window["retrieval"]["recon"] > 0


# ---- checkpoint state ------------------------------------------------------------------------


def saved_and_loaded(state: dict) -> dict:
    """Through torch.save and torch.load(weights_only=True), as the worker's checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def without_time(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "updated_at"}


def test_state_round_trip_gives_identical_reports_and_gauges(learner, media):
    w0, w1 = names()
    monitor = StreamMonitor(monitor_cfg(every=2), learner)
    run_two_segments(monitor, learner, media, w0, w1)
    state = saved_and_loaded(monitor.state_dict())
    for w in (w0, w1):  # what a fresh process would show
        telemetry.PROBE_CLIPS.remove(w)
        telemetry.FORGETTING.remove(w, "a2v", "1")
    restored = StreamMonitor(monitor_cfg(every=2), learner)
    restored.load_state_dict(state)
    assert without_time(restored.summary(4, 4)) == without_time(monitor.summary(4, 4))
    assert gauge("flava_probe_clips", window=w0) == 4
    assert gauge("flava_forgetting_ratio", window=w0, direction="a2v", k="1") == pytest.approx(
        monitor.tracker.state(w0).forgetting["a2v"]["r1"] / 100
    )
    # the same probes, bit for bit: the next evaluation gives the same R@K and forgetting
    assert restored.evaluate(6) == monitor.evaluate(6)
    assert restored.tracker.state(w0) == monitor.tracker.state(w0)
    assert restored.tracker.state(w0).evaluations == 3


def test_state_holds_float16_probes_within_the_caps(learner, media):
    tag = uuid.uuid4().hex[:6]
    cfg = monitor_cfg(probes_per_window=3, max_windows=2)
    monitor = StreamMonitor(cfg, learner)
    for i in range(3):  # three windows of four probes: one window and one probe each too many
        feed(monitor, learner, media["probe0"], f"w{i}-{tag}", "probe", 0)
    state = saved_and_loaded(monitor.state_dict())
    assert [w["name"] for w in state["windows"]] == [f"w1-{tag}", f"w2-{tag}"]
    clip = media["probe0"][0][1]
    one = probe_bytes(tuple(clip.fbank.shape), tuple(clip.frames.shape))
    total = 0
    for w in state["windows"]:
        assert len(w["ids"]) == 3 and w["fbank"].shape == (3, *clip.fbank.shape)
        assert w["fbank"].dtype == w["frames"].dtype == torch.float16
        total += w["fbank"].nbytes + w["frames"].nbytes
    assert total == 6 * one and 6 == cfg.max_probes
    smaller = StreamMonitor(monitor_cfg(probes_per_window=2, max_windows=2), learner)
    smaller.load_state_dict(state)  # settings shrank since the save: cut, first probes kept
    assert [len(w.probes) for w in smaller.windows.values()] == [2, 2]
    assert smaller.windows[f"w2-{tag}"].probes.ids == state["windows"][1]["ids"][:2]
