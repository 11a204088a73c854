"""The stream monitor with the real tiny learner on real decoded clips, and a real Redis."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import uuid

import pytest
import redis
import torch
from prometheus_client import REGISTRY, generate_latest

from contract import wire
from tests.queueing import enqueue
from worker import telemetry
from worker.builtin import builtin_path
from worker.core.learner import Batch, build_learner
from worker.core.media import decode_clip
from worker.core.model import preset
from worker.core.monitors import DriftConfig, embed_chunked
from worker.core.synthetic import StreamConfig, make_clip, segment_specs
from worker.monitoring import MonitorConfig, StreamMonitor, format_summary, probe_bytes
from worker.runner import Worker
from worker.warmstart import warm_start

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
        monitor_compat_lags="1,3",  # as the environment gives it
        der_alpha=0.0,
    )
    client = redis.Redis.from_url(redis_url)
    keys = wire.Keys(prefix)
    for data, _ in media["probe0"]:
        enqueue(client, keys, data, "probe", "segment-0")
    for data, _ in media["train0"][:6]:
        enqueue(client, keys, data, "train", "segment-0")
    worker = Worker(settings, client)
    worker.start()
    try:
        worker.iterate()  # the probes: no step
        worker.iterate()  # four training clips: step 1, evaluation
        first = worker.version
        summary = json.loads(client.get(keys.monitor))
        worker.iterate()  # two more: step 2, evaluation
        latest = json.loads(client.get(keys.monitor))
    finally:
        worker.pool.shutdown()
        client.close()
    assert worker.learner.cfg.der_alpha == 0.0
    assert summary["step"] == 1 and summary["current_window"] == "segment-0"
    window = summary["windows"]["segment-0"]
    assert window["probes"] == 4 and window["trained"] is True
    assert window["retrieval"]["evaluations"] == 1 and window["retrieval"]["recon"] > 0
    assert window["cross_version"] == []  # one evaluation: nothing to compare with yet
    assert latest["cross_version"]["lags"] == [1, 3]
    [lag1] = latest["windows"]["segment-0"]["cross_version"]
    assert (lag1["query_version"], lag1["gallery_version"]) == (worker.version, first)
    assert lag1["updates_apart"] == 1 and lag1["probes"] == 4 and lag1["chance"] == 25.0


# ---- checkpoint state ------------------------------------------------------------------------


def saved_and_loaded(state: dict) -> dict:
    """Through torch.save and torch.load(weights_only=True), as the worker's checkpoint goes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def without_time(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if k != "updated_at"}


# ---- cross-version retrieval -------------------------------------------------------------


def r1(queries: torch.Tensor, gallery: torch.Tensor) -> float:
    """R@1 (%) by brute force: the share of queries whose most similar gallery row is theirs."""
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    g = torch.nn.functional.normalize(gallery.float(), dim=1)
    return 100.0 * float(((q @ g.t()).argmax(1) == torch.arange(len(q))).double().mean())


def test_cross_version_figures_use_the_gallery_each_version_embedded(media):
    """A pretrained learner trained between evaluations: the lag-k figure is R@1 of today's
    probe embeddings against those the version k evaluations back made; lag 0 gives 1."""
    learner = build_learner("finetune", preset("tiny"))  # its own: this test trains it
    warm_start(learner, builtin_path("tiny"))
    w0, w1 = names()
    monitor = StreamMonitor(monitor_cfg(compat_lags=(0, 1, 2), recon=False), learner)
    feed(monitor, learner, media["probe0"] + media["probe1"], w0, "probe", 0)
    feed(monitor, learner, media["probe1"][:3], w1, "probe", 0)
    probes = monitor.windows[w0].probes.batch()
    train = [c for _, c in media["train0"]]
    models = {}
    for update in range(3):
        if update:
            learner.step(
                Batch(torch.stack([c.fbank for c in train]), torch.stack([c.frames for c in train]))
            )
        version = f"5.{learner.step_count}"
        models[version] = copy.deepcopy(learner.model.state_dict())
        monitor.evaluate(update, version)
        if update == 1:  # a probe joins w1 between evaluations
            feed(monitor, learner, media["probe1"][3:], w1, "probe", 1)
    figures = {c.lag: c for c in monitor.compat.report(w0)}
    assert [(c.query_version, c.gallery_version) for c in figures.values()] == [
        ("5.2", "5.2"),
        ("5.2", "5.1"),
        ("5.2", "5.0"),
    ]
    now_a, now_v = (x.half() for x in embed_chunked(learner, probes))
    assert figures[0].same == figures[0].cross == {"a2v": r1(now_a, now_v), "v2a": r1(now_v, now_a)}
    assert figures[0].ratio["a2v"] == 1.0 and figures[0].ratio["v2a"] == 1.0  # both above 0
    for lag, version in ((1, "5.1"), (2, "5.0")):
        learner.model.load_state_dict(models[version])  # that version, re-made
        old_a, old_v = (x.half() for x in embed_chunked(learner, probes))
        assert not torch.equal(old_v, now_v)  # the updates moved the space
        c = figures[lag]
        assert c.cross == {"a2v": r1(now_a, old_v), "v2a": r1(now_v, old_a)}
        assert (c.updates_apart, c.probes, c.chance) == (lag, 8, 12.5)
        for d in ("a2v", "v2a"):
            assert c.ratio[d] == pytest.approx(c.cross[d] / c.same[d])
            assert gauge(
                "flava_cross_version_recall_ratio", window=w0, direction=d, lag=str(lag)
            ) == pytest.approx(c.cross[d] / 100)
            assert gauge(
                "flava_cross_version_relative_ratio", window=w0, direction=d, lag=str(lag)
            ) == pytest.approx(c.ratio[d])
        assert gauge("flava_cross_version_updates", window=w0, lag=str(lag)) == lag
    # w1 had 3 probes at version 5.0 and 5.1, then 4: compared on the 3 both embedded
    assert [c.probes for c in monitor.compat.report(w1)] == [4, 3, 3]
    text = generate_latest(REGISTRY).decode()  # what /metrics serves
    assert f'flava_cross_version_relative_ratio{{direction="v2a",lag="2",window="{w0}"}}' in text


def test_an_undefined_cross_version_ratio_is_nan_on_the_gauge_and_null_in_the_summary(
    learner, media
):
    """The random tiny model finds no a2v pair first among probe0's clips: same-version R@1
    0, so the ratio is undefined, not a number made up."""
    w0, _ = names()
    monitor = StreamMonitor(monitor_cfg(compat_lags=(0,)), learner)
    feed(monitor, learner, media["probe0"], w0, "probe", 0)
    monitor.evaluate(1, "0.1")
    [figure] = monitor.compat.report(w0)
    assert figure.same["a2v"] == 0.0, "precondition: the random model misses every a2v pair"
    assert figure.ratio["a2v"] is None and figure.ratio["v2a"] == 1.0
    assert math.isnan(
        gauge("flava_cross_version_relative_ratio", window=w0, direction="a2v", lag="0")
    )
    assert gauge("flava_cross_version_recall_ratio", window=w0, direction="a2v", lag="0") == 0.0
    summary = json.loads(json.dumps(monitor.summary(1, "0.1")))
    [entry] = summary["windows"][w0]["cross_version"]
    assert entry["ratio"] == {"a2v": None, "v2a": 1.0} and entry["query_version"] == "0.1"
    assert summary["cross_version"]["lags"] == [0]
    assert any("cross-version" in line for line in format_summary(summary))


def test_state_round_trip_gives_identical_reports_and_gauges(learner, media):
    w0, w1 = names()
    monitor = StreamMonitor(monitor_cfg(every=2), learner)
    run_two_segments(monitor, learner, media, w0, w1)
    state = saved_and_loaded(monitor.state_dict())
    for w in (w0, w1):  # what a fresh process would show
        telemetry.PROBE_CLIPS.remove(w)
        telemetry.FORGETTING.remove(w, "a2v", "1")
        telemetry.CROSS_VERSION_RECALL.remove(w, "v2a", "1")
    restored = StreamMonitor(monitor_cfg(every=2), learner)
    restored.load_state_dict(state)
    assert without_time(restored.summary(4, 4)) == without_time(monitor.summary(4, 4))
    assert [c.gallery_version for c in restored.compat.report(w0)] == ["2"]  # the step-2 one
    assert gauge("flava_cross_version_recall_ratio", window=w0, direction="v2a", lag="1") == (
        pytest.approx(monitor.compat.report(w0)[0].cross["v2a"] / 100)
    )
    assert gauge("flava_probe_clips", window=w0) == 4
    assert gauge("flava_forgetting_ratio", window=w0, direction="a2v", k="1") == pytest.approx(
        monitor.tracker.state(w0).forgetting["a2v"]["r1"] / 100
    )
    # the same probes, bit for bit: the next evaluation gives the same R@K and forgetting
    assert restored.evaluate(6, "0.6") == monitor.evaluate(6, "0.6")
    assert restored.tracker.state(w0) == monitor.tracker.state(w0)
    assert restored.tracker.state(w0).evaluations == 3
    assert restored.compat.report(w0) == monitor.compat.report(w0)
    # a checkpoint from before cross-version figures: they start empty, the rest loads
    older = StreamMonitor(monitor_cfg(every=2), learner)
    older.load_state_dict({k: v for k, v in state.items() if k != "compat"})
    assert older.compat.windows() == [] and older.tracker.windows() == [w0, w1]


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


def test_a_shift_of_the_embeddings_is_a_change_point_counted_exported_and_summarised(
    learner, media
):
    """Batches of 4 clips; their audio embeddings N(0, I) in 16 dimensions, shifted by 2 from
    step 21 on (the monitor's input, not the model's: the clips and the monitor are real)."""
    w0, _ = names()
    cfg = monitor_cfg(drift=DriftConfig(window=16, min_samples=4, permutations=199))
    monitor = StreamMonitor(cfg, learner)
    items = media["train0"][:4]
    clips, g = [c for _, c in items], torch.Generator().manual_seed(0)
    counted = {m: gauge("flava_drift_change_points_total", modality=m) for m in ("audio", "video")}
    assert None not in counted.values()  # the counters exist before any change point
    for step in range(1, 41):
        emb_a = torch.randn(4, 16, generator=g) + (2.0 if step > 20 else 0.0)
        emb_v = torch.randn(4, 16, generator=g)
        monitor.after_batch(entries_of(items, w0, "train"), clips, emb_a, emb_v, step, f"1.{step}")
    found = monitor.changes.recent
    assert [c.series for c in found] == ["audio"] and 21 <= found[0].step <= 26, found
    assert found[0].version == f"1.{found[0].step}"
    assert gauge("flava_drift_change_points_total", modality="audio") == counted["audio"] + 1
    assert gauge("flava_drift_change_points_total", modality="video") == counted["video"]
    assert gauge("flava_drift_last_change_point_timestamp_seconds", modality="audio") == found[0].at
    audio = monitor.last_report.modalities["audio"]
    assert audio.drifted and audio.mmd2 > audio.threshold and audio.pvalue == 1 / 200
    assert gauge("flava_drift_mmd2_threshold", modality="audio") == audio.threshold
    assert gauge("flava_drift_pvalue", modality="audio") == audio.pvalue
    summary = json.loads(json.dumps(monitor.summary(40, "1.40")))
    assert summary["change_points"]["counts"] == {"audio": 1}
    assert summary["change_points"]["recent"][0]["step"] == found[0].step
    assert summary["drift"]["alpha"] == 0.01 and summary["drift"]["modalities"]["audio"]["drifted"]
