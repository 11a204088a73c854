import io

import pytest
import torch

from worker.core.memory import ReplayMemory


def _batch(start: int, batch: int = 4) -> dict:
    ids = torch.arange(start, start + batch)
    return {
        "clip_id": ids,
        "fbank": ids[:, None, None].float().expand(batch, 6, 3).clone(),
        "q_a_hat": torch.randn(batch, 2, 4),
        "C_v": torch.rand(batch, 10),
    }


def test_fills_then_never_exceeds_capacity():
    mem = ReplayMemory(10, torch.Generator().manual_seed(0))
    assert len(mem) == 0 and mem.capacity == 10
    slots = mem.add(_batch(0))
    assert slots.tolist() == [0, 1, 2, 3] and len(mem) == 4
    for start in range(4, 200, 4):
        mem.add(_batch(start))
        assert len(mem) <= 10
    assert len(mem) == 10 and mem.seen == 200
    ids = mem.read(torch.arange(10))["clip_id"]
    assert ids.unique().numel() == 10 and ids.max() < 200


def test_stored_rows_match_their_clip():
    mem = ReplayMemory(6, torch.Generator().manual_seed(1))
    for start in range(0, 40, 4):
        mem.add(_batch(start))
    items = mem.read(torch.arange(6))
    assert torch.equal(items["fbank"][:, 0, 0], items["clip_id"].float())


def test_reservoir_keeps_each_clip_with_probability_capacity_over_n():
    capacity, n_clips, runs = 2, 6, 3000
    counts = torch.zeros(n_clips)
    gen = torch.Generator().manual_seed(2)
    for _ in range(runs):
        mem = ReplayMemory(capacity, gen)
        for start in range(0, n_clips, 3):
            mem.add({"clip_id": torch.arange(start, start + 3)})
        counts[mem.read(torch.arange(capacity))["clip_id"]] += 1
    p = capacity / n_clips
    std = (runs * p * (1 - p)) ** 0.5
    assert ((counts - runs * p).abs() < 4 * std).all(), counts
    assert counts.sum() == runs * capacity


def test_sample_distinct_and_bounded():
    mem = ReplayMemory(8, torch.Generator().manual_seed(3))
    mem.add(_batch(0, batch=5))
    out = mem.sample(16, torch.Generator().manual_seed(0))
    assert out.slots.numel() == 5 and out.slots.unique().numel() == 5
    assert torch.equal(out.items["clip_id"], out.slots)  # slots 0..4 hold clips 0..4
    small = mem.sample(3, torch.Generator().manual_seed(0))
    assert small.items["q_a_hat"].shape == (3, 2, 4)
    with pytest.raises(ValueError):
        ReplayMemory(4).sample(1)


def test_rejects_mismatched_fields():
    mem = ReplayMemory(4)
    mem.add(_batch(0))
    with pytest.raises(ValueError):
        mem.add({"clip_id": torch.arange(2)})
    bad = _batch(0)
    bad["C_v"] = torch.rand(4, 11)
    with pytest.raises(ValueError):
        mem.add(bad)
    with pytest.raises(ValueError):
        mem.add({**_batch(0), "C_v": torch.rand(3, 10)})


def test_state_dict_round_trip_weights_only():
    mem = ReplayMemory(6, torch.Generator().manual_seed(4))
    for start in range(0, 24, 4):
        mem.add(_batch(start))
    buf = io.BytesIO()
    torch.save(mem.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    restored = ReplayMemory(6, torch.Generator().manual_seed(99))
    restored.load_state_dict(state)
    assert restored.seen == mem.seen and len(restored) == len(mem)
    for name in mem.fields:
        assert torch.equal(restored.read(torch.arange(6))[name], mem.read(torch.arange(6))[name])
    nxt = _batch(100)
    assert torch.equal(mem.add(nxt), restored.add(nxt))  # reservoir RNG state restored too
    with pytest.raises(ValueError):
        ReplayMemory(7).load_state_dict(state)


def test_nbytes_counts_preallocated_fields():
    mem = ReplayMemory(10)
    assert mem.nbytes() == 0
    mem.add(_batch(0, batch=2))
    per_clip = 8 + 6 * 3 * 4 + 2 * 4 * 4 + 10 * 4  # int64 id, float32 fields
    assert mem.nbytes() == 10 * per_clip


def test_patches_only_entries_keep_dtypes():
    """STELLA+ stores the selected tokens (K, P) and their int64 ids (K,) per clip."""
    mem = ReplayMemory(4)
    tokens = torch.randn(3, 5, 12, dtype=torch.float16)
    ids = torch.tensor([[0, 3, 4, 7, 9], [1, 2, 5, 6, 8], [0, 1, 2, 3, 4]])
    mem.add({"tokens_v": tokens, "ids_v": ids})
    out = mem.read(torch.arange(3))
    assert out["ids_v"].dtype == torch.long and torch.equal(out["ids_v"], ids)
    assert out["tokens_v"].dtype == torch.float16 and torch.equal(out["tokens_v"], tokens)
    assert mem.nbytes() == 4 * (5 * 12 * 2 + 5 * 8)


def test_stored_tensors_are_detached_copies():
    mem = ReplayMemory(2)
    x = torch.ones(1, 3, requires_grad=True)
    mem.add({"emb_a": x * 2})
    stored = mem.read(torch.tensor([0]))["emb_a"]
    assert not stored.requires_grad and stored.tolist() == [[2.0, 2.0, 2.0]]


def _same(a: ReplayMemory, b: ReplayMemory) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (
        sa["seen"] == sb["seen"]
        and torch.equal(sa["rng_state"], sb["rng_state"])
        and all(torch.equal(sa["fields"][k], sb["fields"][k]) for k in sa["fields"])
    )


def test_change_segments_rebuild_the_memory_exactly():
    mem = ReplayMemory(8, torch.Generator().manual_seed(3))
    segments = []
    for start in range(0, 60, 4):  # fills, then the reservoir overwrites random slots
        mem.add(_batch(start))
        if start % 12 == 8:
            segments.append(mem.take_changes())
    segments.append(mem.take_changes())
    assert len(segments[-1]["slots"]) < 8  # only the rows written since the last segment
    rebuilt = ReplayMemory(8)
    for seg in segments:
        rebuilt.apply_changes(seg)
    assert _same(mem, rebuilt)
    rebuilt.add(_batch(100))
    mem.add(_batch(100))
    assert _same(mem, rebuilt)  # the reservoir goes on identically


def test_a_full_segment_alone_rebuilds_and_loaded_memories_count_as_unsaved():
    mem = ReplayMemory(8, torch.Generator().manual_seed(4))
    for start in range(0, 40, 4):
        mem.add(_batch(start))
    mem.take_changes()
    assert len(mem.take_changes()["slots"]) == 0  # nothing new
    full = mem.take_changes(everything=True)
    rebuilt = ReplayMemory(8)
    rebuilt.apply_changes(full)
    assert _same(mem, rebuilt)
    loaded = ReplayMemory(8)
    loaded.load_state_dict(mem.state_dict())  # e.g. from an older full checkpoint
    assert len(loaded.take_changes()["slots"]) == 8
    loaded.load_state_dict(mem.state_dict())
    loaded.forget_changes()
    assert len(loaded.take_changes()["slots"]) == 0
