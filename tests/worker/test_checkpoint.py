"""Checkpoint files: atomic writes, pruning, fallback past a damaged newest file, formats,
generations and the ledger's hash chain (worker/checkpoint.py)."""

from __future__ import annotations

import json

import pytest
import torch

from worker.checkpoint import (
    FORMAT,
    GENESIS,
    CheckpointFormatError,
    CheckpointJob,
    CheckpointWriter,
    LedgerSegment,
    append_ledger,
    checkpoint_name,
    latest_checkpoint,
    ledger_chain,
    list_checkpoints,
    load_checkpoint,
    load_newest,
    next_generation,
    remove_stale_temps,
    save_checkpoint,
)


def state(n: int) -> dict:
    return {"format": FORMAT, "weights": torch.full((3,), float(n)), "counters": {"updates": n}}


def test_save_keeps_the_newest_by_version_not_by_name(tmp_path):
    for gen, n in [(1, 900), (1, 1000), (2, 950), (2, 960)]:
        save_checkpoint(tmp_path, checkpoint_name(gen, n), state(n), keep=3)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == [checkpoint_name(1, 1000), checkpoint_name(2, 950), checkpoint_name(2, 960)]
    assert latest_checkpoint(tmp_path).name == checkpoint_name(2, 960)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_format_1_names_sort_as_generation_0(tmp_path):
    save_checkpoint(tmp_path, "ckpt-0000000500.pt", {"counters": {"version": 500}})
    save_checkpoint(tmp_path, checkpoint_name(1, 20), state(20))
    assert [p.name for p in list_checkpoints(tmp_path)][0] == "ckpt-0000000500.pt"
    assert load_checkpoint(tmp_path / "ckpt-0000000500.pt")["counters"]["version"] == 500


def test_a_failed_write_leaves_the_previous_file_and_no_temp(tmp_path):
    save_checkpoint(tmp_path, checkpoint_name(1, 1), state(1))

    class Unsavable:
        def __reduce__(self):
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        save_checkpoint(tmp_path, checkpoint_name(1, 2), {"x": Unsavable()})
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(1, 1)]


def test_stale_temps_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / f".{checkpoint_name(1, 5)}.tmp").write_bytes(b"half a checkpoint")
    (tmp_path / ".generation.tmp").write_bytes(b"")
    save_checkpoint(tmp_path, checkpoint_name(1, 4), state(4))
    assert remove_stale_temps(tmp_path) == 2
    assert [p.name for p in tmp_path.iterdir()] == [checkpoint_name(1, 4)]


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    save_checkpoint(tmp_path, checkpoint_name(1, 1), state(1))
    newest = save_checkpoint(tmp_path, checkpoint_name(1, 2), state(2))
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    skipped = []
    path, loaded, _ = load_newest(tmp_path, lambda p, exc: skipped.append(p))
    assert skipped == [newest] and path.name == checkpoint_name(1, 1)
    assert loaded["counters"]["updates"] == 1
    newest.unlink()
    (tmp_path / checkpoint_name(1, 1)).write_bytes(b"garbage")
    assert load_newest(tmp_path, lambda p, exc: None) is None  # nothing readable: cold start


def test_a_newer_format_is_refused_with_a_clear_message(tmp_path):
    save_checkpoint(tmp_path, checkpoint_name(1, 1), {"format": FORMAT + 1})
    with pytest.raises(CheckpointFormatError, match="upgrade the worker"):
        load_newest(tmp_path, lambda p, exc: None)


def test_generations_only_go_up(tmp_path):
    assert next_generation(tmp_path) == 1
    assert next_generation(tmp_path) == 2
    save_checkpoint(tmp_path, checkpoint_name(7, 3), state(3))
    assert next_generation(tmp_path) == 8  # above any checkpoint's
    assert next_generation(tmp_path, published=20) == 21  # and above what Redis published
    assert (tmp_path / "generation").read_text().strip() == "21"


def test_the_ledger_chain_follows_prev_links_and_catches_tampering(tmp_path):
    first = LedgerSegment.after(GENESIS, "1.5", ["a", "b"])
    orphan = LedgerSegment.after(first.hash, "1.9", ["c"])  # never completed (crash)
    second = LedgerSegment.after(first.hash, "2.8", ["c", "d"])
    for seg in (first, orphan, second):
        append_ledger(tmp_path, seg)
    chain = ledger_chain(tmp_path, second.hash)
    assert [s.version for s in chain] == ["1.5", "2.8"]
    assert [c for s in chain for c in s.clip_ids] == ["a", "b", "c", "d"]
    lines = (tmp_path / "ledger.jsonl").read_text().splitlines()
    doctored = json.loads(lines[0]) | {"clip_ids": ["a"]}  # a clip removed after the fact
    (tmp_path / "ledger.jsonl").write_text("\n".join([json.dumps(doctored), *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match="missing or altered"):
        ledger_chain(tmp_path, second.hash)


def test_a_torn_ledger_line_is_skipped_and_never_glued_to(tmp_path):
    first = LedgerSegment.after(GENESIS, "1.5", ["a"])
    append_ledger(tmp_path, first)
    with open(tmp_path / "ledger.jsonl", "a") as f:
        f.write('{"version": "1.9", "prev": "')  # a crash mid-append
    second = LedgerSegment.after(first.hash, "2.6", ["b"])
    append_ledger(tmp_path, second)
    assert [s.version for s in ledger_chain(tmp_path, second.hash)] == ["1.5", "2.6"]


def test_the_writer_works_off_thread_and_reports_failures(tmp_path):
    writer = CheckpointWriter(tmp_path / "ck", keep=2)
    seg = LedgerSegment.after(GENESIS, "1.1", ["a"])
    writer.submit(CheckpointJob(checkpoint_name(1, 1), state(1), seg))
    with pytest.raises(RuntimeError, match="still being written"):
        writer.submit(CheckpointJob(checkpoint_name(1, 2), state(2), seg))
    job = writer.finished(wait=True)
    assert job.error is None and (tmp_path / "ck" / checkpoint_name(1, 1)).exists()
    assert ledger_chain(tmp_path / "ck", seg.hash)[0].clip_ids == ["a"]
    (tmp_path / "blocked").write_text("a file where the directory should be")
    blocked = CheckpointWriter(tmp_path / "blocked", keep=2)
    blocked.submit(CheckpointJob(checkpoint_name(1, 1), state(1), seg))
    assert isinstance(blocked.finished(wait=True).error, OSError)
