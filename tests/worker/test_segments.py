"""The replay memory's segment files (worker/segments.py): small per checkpoint, compacted,
collected when no kept checkpoint lists them."""

from __future__ import annotations

import torch

from worker.core.memory import ReplayMemory
from worker.segments import MemorySegments


def _add(mem: ReplayMemory, start: int, n: int = 4) -> None:
    ids = torch.arange(start, start + n)
    mem.add({"x": ids[:, None].float().expand(n, 16).clone()})


def test_segments_hold_only_new_rows_and_compact_after_the_capacity_in_rows(tmp_path):
    mem, segs = ReplayMemory(8, torch.Generator().manual_seed(0)), MemorySegments(tmp_path, 8)
    lists = []
    for i in range(30):
        _add(mem, i * 4)
        lists.append(segs.take(mem, f"1.{i + 1}"))
        segs.write(segs.unwritten)
        segs.written(list(segs.unwritten))
    rows = [len(torch.load(tmp_path / ls[-1], weights_only=True)["slots"]) for ls in lists]
    restarts = [i for i, ls in enumerate(lists) if len(ls) == 1]
    assert restarts[0] == 0 and len(restarts) >= 2  # a full segment after 8 rows of deltas
    assert all(rows[i] == 8 for i in restarts[1:])  # the whole memory
    assert all(rows[i] <= 4 for i in range(len(rows)) if i not in restarts)  # only new rows
    for a, b in zip(restarts, restarts[1:], strict=False):
        assert sum(rows[a + 1 : b]) >= 8 * segs.compact_factor
    rebuilt = ReplayMemory(8)
    MemorySegments(tmp_path, 8).restore(rebuilt, lists[-1], segs.load(lists[-1]))
    assert torch.equal(rebuilt.state_dict()["fields"]["x"], mem.state_dict()["fields"]["x"])


def test_segments_no_kept_checkpoint_lists_are_deleted(tmp_path):
    mem, segs = ReplayMemory(8, torch.Generator().manual_seed(0)), MemorySegments(tmp_path, 8)
    kept: list[str] = []
    lists: dict[str, list[str]] = {}
    for i in range(12):  # long enough for a compaction
        _add(mem, i * 4)
        lists[f"ckpt-{i}"] = segs.take(mem, f"1.{i + 1}")
        segs.write(segs.unwritten)
        segs.written(list(segs.unwritten))
        kept = [*kept, f"ckpt-{i}"][-2:]
        segs.collect(f"ckpt-{i}", lists[f"ckpt-{i}"], kept)
    on_disk = sorted(p.name for p in tmp_path.glob("mem-*.pt"))
    assert on_disk == sorted({n for k in kept for n in lists[k]})  # what the kept two list
    assert "mem-000001-0000000001.pt" not in on_disk  # listed by no kept checkpoint
    (tmp_path / "segments.json").write_text("not json")  # a lost manifest: delete nothing
    _add(mem, 99)
    listed = segs.take(mem, "1.5")
    segs.write(segs.unwritten)
    segs.collect("ckpt-4", listed, ["ckpt-3", "ckpt-4"])
    assert set(on_disk) <= {p.name for p in tmp_path.glob("mem-*.pt")}
