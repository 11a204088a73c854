"""The worker loop on a real Redis with real encoded clips and the real tiny learner."""

from __future__ import annotations

import io
import json
import logging
import threading
import time

import pytest
import torch
from prometheus_client import REGISTRY

from contract import wire
from contract.logs import configure
from tests.queueing import enqueue
from worker import telemetry
from worker.core.synthetic import StreamConfig, make_clip, segment_specs
from worker.runner import Worker
from worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    cfg = StreamConfig(num_segments=2)
    specs = segment_specs(cfg, 0, 6, seed=1) + segment_specs(cfg, 1, 2, seed=1)
    return [make_clip(s, cfg) for s in specs]


@pytest.fixture
def settings(worker_settings) -> WorkerSettings:
    return worker_settings(decode_processes=2)


def started(settings, client) -> Worker:
    w = Worker(settings, client)
    w.start()
    return w


def test_batch_is_learned_embedded_and_acked(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips[:4]]
    settings.embed_with = "updated"
    w = started(settings, client)
    report = w.iterate()
    assert (report.learned, report.dead) == (4, 0)
    assert report.stats is not None and report.stats.loss > 0
    for cid in ids:
        emb = wire.Embedding.from_fields(client.hgetall(keys.embedding(cid)))
        assert emb.model_version == "1.1" and emb.step == 1  # generation 1, one update
        assert len(emb.audio) == len(emb.video) == w.model_cfg.dim
        assert client.hget(keys.clip(cid), "state") == b"embedded"
    assert w.queue.depths() == (4, 4, 0)  # pending until a checkpoint holds the update
    assert w.settle()
    assert all(client.hget(keys.clip(cid), "state") == b"learned" for cid in ids)
    assert w.queue.depths() == (0, 0, 0)


def test_flava_publishes_pre_update_embeddings_stamped_with_that_version(
    settings, client, clips, prefix
):
    from worker.core.media import decode_clip
    from worker.runner import _batch

    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips[:4]]
    w = started(settings, client)
    assert settings.method == "flava" and settings.embed_with == "pre_update"
    expected_a, _ = w.learner.embed(_batch([decode_clip(c, w.media_cfg) for c in clips[:4]]))
    w.iterate()
    assert w.counters.updates == 1
    for i, cid in enumerate(ids):
        emb = wire.Embedding.from_fields(client.hgetall(keys.embedding(cid)))
        assert (emb.model_version, emb.step) == ("1.0", 0)  # made by the weights before it
        assert torch.allclose(torch.tensor(emb.audio), expected_a[i], atol=1e-4)


def test_undecodable_clip_is_dead_lettered_and_worker_goes_on(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    bad = enqueue(client, keys, b"\x00\x00\x00\x18ftypmp42 this is not a video")
    good = [enqueue(client, keys, c) for c in clips[:2]]
    w = started(settings, client)
    report = w.iterate()
    assert (report.learned, report.dead) == (2, 1)
    assert "Undecodable" in report.reasons[0] or "NoVideo" in report.reasons[0]
    assert client.hget(keys.clip(bad), "state") == b"dead"
    w.settle()
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in good)


def test_duplicate_delivery_is_not_trained_twice(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    cid = enqueue(client, keys, clips[0])
    w = started(settings, client)
    w.iterate()
    entry = wire.ClipEntry(cid, len(clips[0]), "video/mp4")
    client.xadd(keys.stream, entry.to_fields())  # a stray second entry for a learned clip
    report = w.iterate()
    assert (report.duplicates, report.learned) == (1, 0)
    assert w.counters.updates == 1
    assert w.settle() and w.queue.depths()[1] == 0  # the second entry is acked too


def test_probe_clips_are_embedded_but_not_trained(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    cid = enqueue(client, keys, clips[5], purpose="probe")
    w = started(settings, client)
    report = w.iterate()
    assert (report.probed, report.learned, w.counters.updates) == (1, 0, 0)
    assert w.settle() and client.hget(keys.clip(cid), "state") == b"probed"
    assert wire.Embedding.from_fields(client.hgetall(keys.embedding(cid))).model_version == "1.0"


def test_over_delivered_entry_is_dead_lettered(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    settings.max_deliveries = 1
    cid = enqueue(client, keys, clips[0])
    first = Worker(settings, client)
    first.start()
    first.queue.next_batch(4, 10)  # delivered, then the worker "crashes"
    report = started(settings, client).iterate()
    assert report.dead == 1 and "delivered 2 times without an update" in report.reasons[0]
    assert client.hget(keys.clip(cid), "state") == b"dead"


def test_restart_resumes_from_checkpoint_in_a_new_generation(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    for c in clips[:4]:
        enqueue(client, keys, c)
    w = started(settings, client)
    w.iterate()
    assert w.settle()  # 1.1 durable, its clips acked
    weights = {k: v.clone() for k, v in w.learner.model.state_dict().items()}
    tail = [enqueue(client, keys, c) for c in clips[4:8]]
    w.iterate()  # 1.2 published, not checkpointed: the worker "crashes"
    w.heartbeat(force=True)
    w.pool.shutdown()
    again = started(settings, client)
    assert (again.counters.step, again.version) == (1, "2.1")  # 1.2 is never named again
    restored = again.learner.model.state_dict()
    assert all(bool((restored[k] == v).all()) for k, v in weights.items())
    report = again.iterate()  # exactly the un-checkpointed tail comes back and is relearned
    assert sorted(d.entry.clip_id for d, _ in again.checkpoints.tail.settles) == sorted(tail)
    assert (report.learned, report.dead, again.version) == (4, 0, "2.2")
    assert again.settle() and again.queue.depths() == (0, 0, 0)


def test_run_stops_on_event_and_checkpoints(settings, client, clips, prefix, tmp_path):
    keys = wire.Keys(prefix)
    for c in clips[:4]:
        enqueue(client, keys, c)
    settings.max_steps = 1
    w = Worker(settings, client)
    w.run(threading.Event())
    assert w.version == "1.1"
    assert list((tmp_path / "ckpt").glob("ckpt-000001-0000000001.pt"))
    assert w.queue.depths() == (0, 0, 0)  # acked once that checkpoint was durable


def test_non_finite_loss_skips_update_and_publishes_nothing_from_it(settings, client, clips):
    from worker.core.media import decode_clip

    w = started(settings, client)
    before = {k: v.clone() for k, v in w.learner.model.state_dict().items()}
    clip = decode_clip(clips[0], w.media_cfg)
    clip.fbank[0, 0] = float("nan")
    stats = w._learn([(_train_delivery(), clip)])
    assert stats.skipped and w.counters.updates == 0 and w.counters.step == 1
    after = w.learner.model.state_dict()
    assert all(bool(torch.equal(after[k], v)) for k, v in before.items())


def _train_delivery():
    from worker.queue import Delivery

    return Delivery("0-1", wire.ClipEntry("f" * 64, 1, "video/mp4"), 1)


def test_next_batch_is_read_and_decoded_during_the_update(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    for c in clips[:8]:
        enqueue(client, keys, c)
    w = started(settings, client)
    first = w.iterate()
    assert first.learned == 4 and w._ahead is not None and len(w._ahead.deliveries) == 4
    assert w.queue.depths()[1] == 8  # 4 held for the checkpoint, 4 read ahead
    second = w.iterate()
    assert second.learned == 4 and w.counters.updates == 2
    assert w.queue.depths()[1] == 8 and w.settle() and w.queue.depths() == (0, 0, 0)


def test_a_clip_learned_while_its_duplicate_was_read_ahead_is_not_trained_twice(
    settings, client, clips, prefix
):
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips[:4]]
    entry = wire.ClipEntry(ids[0], len(clips[0]), "video/mp4")
    client.xadd(keys.stream, entry.to_fields())  # a stray second entry, read ahead
    w = started(settings, client)
    assert w.iterate().learned == 4 and len(w._ahead.deliveries) == 1
    report = w.iterate()
    assert (report.duplicates, report.learned, w.counters.updates) == (1, 0, 1)


def test_stop_finishes_the_batch_read_ahead(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    ids = [enqueue(client, keys, c) for c in clips[:8]]
    w = started(settings, client)
    w.iterate()
    assert w._ahead is not None
    stop = threading.Event()
    stop.set()
    w.run(stop)  # stopped before its first iteration: only the batch in hand is finished
    assert all(client.hget(keys.clip(c), "state") == b"learned" for c in ids)
    assert w.queue.depths() == (0, 0, 0) and w.counters.updates == 2


def test_no_read_ahead_on_the_last_allowed_step(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    for c in clips[:8]:
        enqueue(client, keys, c)
    settings.max_steps = 1
    w = started(settings, client)
    w.iterate()
    assert w._ahead is None and w.queue.depths()[1] == 4  # only the batch in hand, held


def test_cold_start_takes_init_weights_and_reports_selection_warmup(
    settings, client, prefix, tmp_path
):
    from worker.core.learner import LearnerConfig, build_learner

    pretrained = build_learner("flava", preset_cfg(), LearnerConfig(seed=7))
    torch.save({"learner": pretrained.state_dict()}, tmp_path / "pretrained.pt")
    settings.init_weights = str(tmp_path / "pretrained.pt")
    w = started(settings, client)
    mine, theirs = w.learner.model.state_dict(), pretrained.model.state_dict()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    info = {k.decode(): v.decode() for k, v in client.hgetall(wire.Keys(prefix).model).items()}
    assert info["selection_step"] == "-1" and float(info["avm_accuracy_ema"]) == 0.5


def preset_cfg():
    from worker.core.model import preset

    return preset("tiny")


# ---- the monitor survives restarts -----------------------------------------------------------


@pytest.fixture(scope="module")
def heldout() -> list[bytes]:
    """Four probe clips of each segment, then two more training clips of segment 1."""
    cfg = StreamConfig(num_segments=2)
    probes = [segment_specs(cfg, s, 4, seed=1, split="heldout") for s in (0, 1)]
    extra = segment_specs(cfg, 1, 4, seed=1)[2:]
    return [make_clip(s, cfg) for s in [*probes[0], *probes[1], *extra]]


def run_until_evaluated(settings, client, keys: wire.Keys, step: int) -> dict:
    """Run a worker in a thread until its summary shows an evaluation at ``step``, then stop
    it as SIGTERM does (the stop event) and return its last published summary."""
    stop, w = threading.Event(), Worker(settings, client)
    thread = threading.Thread(target=w.run, args=(stop,))
    thread.start()
    deadline = time.monotonic() + 120
    while (
        time.monotonic() < deadline
        and monitor_summary(client, keys).get("last_evaluation_step") != step
    ):
        time.sleep(0.1)
    stop.set()
    thread.join(60)
    assert not thread.is_alive()
    return monitor_summary(client, keys)


def monitor_summary(client, keys: wire.Keys) -> dict:
    raw = client.get(keys.monitor)
    return json.loads(raw) if raw else {}


def test_restart_restores_probe_sets_and_forgetting_history(
    worker_settings, client, clips, heldout, prefix, tmp_path
):
    settings = worker_settings(decode_processes=2, monitor_every=1, monitor_window=4)
    keys = wire.Keys(prefix)
    tasks = [f"a-{prefix}", f"b-{prefix}"]
    for task, probes in zip(tasks, (heldout[:4], heldout[4:8]), strict=True):
        for c in probes:
            enqueue(client, keys, c, "probe", task)
    for task, train in zip(tasks, (clips[:4], clips[4:8]), strict=True):
        for c in train:
            enqueue(client, keys, c, "train", task)
    before = run_until_evaluated(settings, client, keys, step=2)
    assert list((tmp_path / "ckpt").glob("ckpt-*.pt"))
    assert [before["windows"][t]["retrieval"]["evaluations"] for t in tasks] == [2, 2]
    client.delete(keys.monitor)
    for series in (telemetry.PROBE_CLIPS, telemetry.FORGETTING, telemetry.FORGETTING_AVG):
        series.clear()  # as in a fresh process

    again = Worker(settings, client)  # same checkpoint dir; no probe is posted again
    again.start()
    try:
        after = monitor_summary(client, keys)
        assert after["windows"] == before["windows"]  # probes, trained, drift, best-so-far
        assert after["average_forgetting"] == before["average_forgetting"]
        assert after["current_window"] == tasks[1] and after["step"] == 2
        for task in tasks:
            retrieval = before["windows"][task]["retrieval"]
            assert gauge("flava_probe_clips", window=task) == 4
            for direction, k in (("a2v", "1"), ("v2a", "avg")):
                metric = "avg" if k == "avg" else f"r{k}"
                assert gauge(
                    "flava_forgetting_ratio", window=task, direction=direction, k=k
                ) == pytest.approx(retrieval["forgetting"][direction][metric] / 100)
        # learning goes on: the restored probes are evaluated again, history continues
        for c in heldout[8:]:
            enqueue(client, keys, c, "train", tasks[1])
        assert again.iterate().learned == 2
        later = monitor_summary(client, keys)
    finally:
        again.pool.shutdown()
    for task in tasks:
        window, old = later["windows"][task], before["windows"][task]["retrieval"]
        assert window["probes"] == 4 and window["retrieval"]["evaluations"] == 3
        best, old_best = window["retrieval"]["best"], old["best"]
        assert all(best[d][m] >= old_best[d][m] for d in old_best for m in old_best[d])


def test_checkpoint_without_monitor_state_still_loads(settings, client, clips, prefix, caplog):
    from worker.checkpoint import (
        checkpoint_name,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )

    keys = wire.Keys(prefix)
    enqueue(client, keys, clips[5], purpose="probe", task=f"t-{prefix}")
    w = started(settings, client)
    w.iterate()
    w.settle()
    w.pool.shutdown()
    state = load_checkpoint(latest_checkpoint(settings.checkpoint_dir))
    assert len(state["monitor"]["windows"][0]["ids"]) == 1
    del state["monitor"]  # a checkpoint written before the monitor was checkpointed
    save_checkpoint(settings.checkpoint_dir, checkpoint_name(5, 0), state)
    with caplog.at_level(logging.INFO, logger="worker.runner"):
        again = started(settings, client)
    again.pool.shutdown()
    assert again.counters.clips_probed == 1 and not again.monitor.windows
    assert "no monitor state" in caplog.text


@pytest.fixture
def json_log():
    """The root logger writes JSON lines (contract/logs.py) to a buffer; restored after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    out = io.StringIO()
    configure("info", "json", out)
    yield out
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


def ask_rollback(client, keys: wire.Keys, version: str) -> None:
    """What POST /model/rollback writes (contract/wire.py's script)."""
    script = client.register_script(wire.REQUEST_ROLLBACK_SCRIPT)
    assert (
        script(keys=[keys.control], args=[f"r-{version}", version, time.time()])[0] == b"requested"
    )


def events(out: io.StringIO, logger: str, starts: str) -> list[dict]:
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [e for e in lines if e["logger"] == logger and e["msg"].startswith(starts)]


def test_generation_checkpoint_and_rollback_lines_carry_version_and_step(
    settings, client, clips, prefix, json_log
):
    keys = wire.Keys(prefix)
    w = started(settings, client)
    for batch in (clips[:4], clips[4:8]):  # 1.1 and 1.2, each made durable
        for c in batch:
            enqueue(client, keys, c)
        w.iterate()
        assert w.settle()
    ask_rollback(client, keys, "1.1")
    w.iterate()  # rolled back: generation 2, checkpointed at once
    ask_rollback(client, keys, "7.7")
    w.iterate()  # refused: no such checkpoint
    w.pool.shutdown()
    (start,) = events(json_log, "worker.runner", "generation 1 starts")
    assert (start["version"], start["step"], start["generation"]) == ("1.0", 0, 1)
    durable = events(json_log, "worker.checkpointing", "checkpoint ")
    assert [(e["version"], e["step"]) for e in durable] == [("1.1", 1), ("1.2", 2), ("2.1", 1)]
    assert durable[0]["checkpoint"] == "ckpt-000001-0000000001.pt"
    (back,) = events(json_log, "worker.runner", "rolled back to 1.1")
    assert (back["version"], back["step"], back["target"], back["generation"]) == (
        "2.1",
        1,
        "1.1",
        2,
    )
    (refused,) = events(json_log, "worker.runner", "rollback to 7.7 refused")
    assert (refused["version"], refused["step"], refused["target"]) == ("2.1", 1, "7.7")
    assert refused["level"] == "error" and "no durable checkpoint" in refused["reason"]


def gauge(name: str, **labels) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_dropped_worker_is_freed_without_the_cyclic_collector(settings, client, clips, prefix):
    """No reference cycle holds a Worker: dropping the last reference frees it (and its
    learner), where a cycle would keep it until a collection that runs on object counts."""
    import gc
    import weakref

    enqueue(client, wire.Keys(prefix), clips[0])
    w = started(settings, client)
    w.iterate()
    w.pool.shutdown()
    worker, learner = weakref.ref(w), weakref.ref(w.learner)
    gc.disable()
    try:
        del w
        assert worker() is None and learner() is None
    finally:
        gc.enable()
