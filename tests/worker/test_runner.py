"""The worker loop on a real Redis with real encoded clips and the real tiny learner."""

from __future__ import annotations

import threading

import pytest
import redis
import torch

from contract import wire
from tests.queueing import enqueue
from worker.core.synthetic import StreamConfig, make_clip, segment_specs
from worker.runner import Worker
from worker.settings import WorkerSettings


@pytest.fixture(scope="module")
def clips() -> list[bytes]:
    cfg = StreamConfig(num_segments=2)
    specs = segment_specs(cfg, 0, 6, seed=1) + segment_specs(cfg, 1, 2, seed=1)
    return [make_clip(s, cfg) for s in specs]


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


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
        assert emb.model_version == 1 and emb.step == 1
        assert len(emb.audio) == len(emb.video) == w.model_cfg.dim
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
    assert w.counters.version == 1
    for i, cid in enumerate(ids):
        emb = wire.Embedding.from_fields(client.hgetall(keys.embedding(cid)))
        assert (emb.model_version, emb.step) == (0, 0)  # made by the weights before the update
        assert torch.allclose(torch.tensor(emb.audio), expected_a[i], atol=1e-4)


def test_undecodable_clip_is_dead_lettered_and_worker_goes_on(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    bad = enqueue(client, keys, b"\x00\x00\x00\x18ftypmp42 this is not a video")
    good = [enqueue(client, keys, c) for c in clips[:2]]
    report = started(settings, client).iterate()
    assert (report.learned, report.dead) == (2, 1)
    assert "Undecodable" in report.reasons[0] or "NoVideo" in report.reasons[0]
    assert client.hget(keys.clip(bad), "state") == b"dead"
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
    assert w.counters.version == 1


def test_probe_clips_are_embedded_but_not_trained(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    cid = enqueue(client, keys, clips[5], purpose="probe")
    w = started(settings, client)
    report = w.iterate()
    assert (report.probed, report.learned, w.counters.version) == (1, 0, 0)
    assert client.hget(keys.clip(cid), "state") == b"probed"
    assert wire.Embedding.from_fields(client.hgetall(keys.embedding(cid))).model_version == 0


def test_over_delivered_entry_is_dead_lettered(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    settings.max_deliveries = 1
    cid = enqueue(client, keys, clips[0])
    first = Worker(settings, client)
    first.start()
    first.queue.next_batch(4, 10)  # delivered, then the worker "crashes"
    report = started(settings, client).iterate()
    assert report.dead == 1 and "delivered 2 times" in report.reasons[0]
    assert client.hget(keys.clip(cid), "state") == b"dead"


def test_restart_resumes_from_checkpoint_versions_never_go_back(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    for c in clips[:4]:
        enqueue(client, keys, c)
    w = started(settings, client)
    w.iterate()
    w.checkpoint()
    weights = {k: v.clone() for k, v in w.learner.model.state_dict().items()}
    for c in clips[4:8]:
        enqueue(client, keys, c)
    w.iterate()  # version 2 published, not checkpointed
    w.heartbeat(force=True)
    again = started(settings, client)
    assert again.counters.step == 1
    assert again.counters.version == 2  # the published version wins over the checkpoint's 1
    restored = again.learner.model.state_dict()
    assert all(bool((restored[k] == v).all()) for k, v in weights.items())


def test_run_stops_on_event_and_checkpoints(settings, client, clips, prefix, tmp_path):
    keys = wire.Keys(prefix)
    for c in clips[:4]:
        enqueue(client, keys, c)
    settings.max_steps = 1
    w = Worker(settings, client)
    w.run(threading.Event())
    assert w.counters.version == 1
    assert list((tmp_path / "ckpt").glob("ckpt-0000000001.pt"))


def test_non_finite_loss_skips_update_and_publishes_nothing_from_it(settings, client, clips):
    from worker.core.media import decode_clip

    w = started(settings, client)
    before = {k: v.clone() for k, v in w.learner.model.state_dict().items()}
    clip = decode_clip(clips[0], w.media_cfg)
    clip.fbank[0, 0] = float("nan")
    stats = w._learn([(_train_delivery(), clip)])
    assert stats.skipped and w.counters.version == 0 and w.counters.step == 1
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
    assert w.queue.depths()[1] == 4  # read ahead: delivered to us, not acked yet
    second = w.iterate()
    assert second.learned == 4 and w.counters.version == 2
    assert w.queue.depths() == (0, 0, 0)


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
    assert (report.duplicates, report.learned, w.counters.version) == (1, 0, 1)


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
    assert w.queue.depths() == (0, 0, 0) and w.counters.version == 2


def test_no_read_ahead_on_the_last_allowed_step(settings, client, clips, prefix):
    keys = wire.Keys(prefix)
    for c in clips[:8]:
        enqueue(client, keys, c)
    settings.max_steps = 1
    w = started(settings, client)
    w.iterate()
    assert w._ahead is None and w.queue.depths()[1] == 0


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
