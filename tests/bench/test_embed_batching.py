"""The embedding batch benchmark (bench/embed_batching.py) at `tiny` on the CPU, one thread.

No timing thresholds (a shared machine): what is deterministic is checked exactly (a call of
4 embeds as 4 calls of 1 do, the same matrix-product FLOPs per clip on both sides, fewer ops
dispatched per clip when batched), timings only for being measured and consistent.
"""

from __future__ import annotations

import pytest
import torch

from bench.embed_batching import (
    build_model,
    embed_call,
    profile_side,
    random_clips,
    speedup,
    time_sides,
)


@pytest.fixture(scope="module")
def model():
    return build_model("tiny", "cpu")


def test_a_batched_call_embeds_each_clip_as_a_call_of_one(model, one_thread):
    clips = random_clips("tiny", 4)
    batched = embed_call(model, clips, "cpu", amp=False)
    singles = torch.cat([embed_call(model, [c], "cpu", amp=False) for c in clips])
    assert batched.shape == (4, 2, model.cfg.dim) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, singles, rtol=1e-4, atol=1e-5)


def test_both_sides_are_timed_and_the_gain_is_their_rate_ratio(model, one_thread):
    sides = time_sides(model, random_clips("tiny", 4), (1, 4), rounds=2)
    assert [s.batch for s in sides] == [1, 4]
    for s in sides:
        assert 0 < s.ms_per_clip_p10 <= s.ms_per_clip <= s.ms_per_clip_p90
        assert s.clips_per_s == pytest.approx(1000 / s.ms_per_clip, rel=1e-2)
        assert s.cpu_ms_per_clip > 0
    assert speedup(sides) == pytest.approx(sides[1].clips_per_s / sides[0].clips_per_s, rel=1e-2)


def test_the_profile_splits_the_same_work_into_fewer_ops_when_batched(model, one_thread):
    clips = random_clips("tiny", 4)
    one, four = (profile_side(model, clips, batch) for batch in (1, 4))
    # the same matrix products per clip (patch embeddings, qkv, proj, mlp), in fewer calls
    assert one.matmul_gflop_per_clip == pytest.approx(four.matmul_gflop_per_clip, rel=1e-3)
    assert one.matmul_gflop_per_clip > 0.5  # ~0.78 GFLOP per clip at tiny
    assert four.op_calls_per_clip < one.op_calls_per_clip / 3
    assert one.top[0].op == "aten::addmm"  # the products dominate even at batch 1
    for prof in (one, four):
        assert {"Linear", "Attention", "outside modules"} <= set(prof.cpu_ms_by_module)
        assert prof.cpu_ms_by_module["Linear"] == max(prof.cpu_ms_by_module.values())
