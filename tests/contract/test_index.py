"""contract/index.py: one version's index on disk, exact and HNSW search."""

from __future__ import annotations

import json

import numpy as np
import pytest

from contract import index as vindex


def _write(tmp_path, version: str, n: int, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    audio, video = rng.standard_normal((n, dim)), rng.standard_normal((n, dim))
    ids = [f"{i:064x}" for i in range(n)]
    vindex.write_index(tmp_path, version, ids, ["t"] * n, audio, video)
    return ids, vindex.unit_rows(audio), vindex.unit_rows(video)


def test_an_index_round_trips_with_unit_rows_and_is_listed_by_version(tmp_path):
    ids, audio, video = _write(tmp_path, "1.20", 50)
    _write(tmp_path, "1.3", 10)
    _write(tmp_path, "2.1", 10)
    assert vindex.complete_versions(tmp_path) == ["1.3", "1.20", "2.1"]  # by (G, N)
    index = vindex.VersionIndex.load(tmp_path, "1.20")
    assert len(index) == 50 and index.ids == ids and not index.graphs
    assert np.allclose(np.linalg.norm(index.parts[0].vectors["audio"], axis=1), 1.0)
    assert np.allclose(index.vector(ids[7], "video"), video[7])
    assert index.vector("f" * 64, "audio") is None
    meta = json.loads((tmp_path / "1.20" / "meta.json").read_text())
    assert meta["count"] == 50 and meta["dim"] == 16 and meta["parts"] == 1


def test_exact_search_ranks_by_cosine_and_leaves_out_the_query(tmp_path):
    ids, audio, video = _write(tmp_path, "0.1", 200)
    index = vindex.VersionIndex.load(tmp_path, "0.1")
    hits = index.search(audio[3], "video", 5)
    expected = np.argsort(-(video @ audio[3]))[:5]
    assert [h.clip_id for h in hits] == [ids[i] for i in expected]
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert hits[0].score == pytest.approx(float(video[expected[0]] @ audio[3]), abs=1e-5)
    self_hits = index.search(audio[3], "audio", 5, exclude={ids[3]})
    assert ids[3] not in [h.clip_id for h in self_hits] and len(self_hits) == 5


def test_hnsw_graphs_are_stored_and_find_the_exact_neighbours(tmp_path, monkeypatch):
    monkeypatch.setattr(vindex, "ANN_MIN", 100)  # store graphs for a small index
    ids, audio, _ = _write(tmp_path, "0.2", 3000, dim=32)
    index = vindex.VersionIndex.load(tmp_path, "0.2")
    assert set(index.graphs) == {"audio", "video"}
    recall = []
    for q in range(50):
        approx = {h.clip_id for h in index.search(audio[q], "video", 10)}
        exact = {h.clip_id for h in index.search(audio[q], "video", 10, exact=True)}
        recall.append(len(approx & exact) / 10)
    assert np.mean(recall) >= 0.95


def test_rewriting_a_version_replaces_it_whole(tmp_path):
    _write(tmp_path, "3.4", 20)
    ids, _, _ = _write(tmp_path, "3.4", 5, seed=1)
    assert vindex.VersionIndex.load(tmp_path, "3.4").ids == ids
    assert [p.name for p in tmp_path.iterdir()] == ["3.4"]  # no temporary left


def test_clips_that_land_later_are_appended_as_parts_and_searched_with_the_rest(tmp_path):
    ids, audio, video = _write(tmp_path, "1.1", 100)
    loaded = vindex.VersionIndex.load(tmp_path, "1.1")
    rng = np.random.default_rng(7)
    late_ids = [f"{i:064x}" for i in range(100, 110)]
    late_a, late_v = rng.standard_normal((10, 16)), rng.standard_normal((10, 16))
    assert vindex.append_part(tmp_path, "1.1", late_ids, ["late"] * 10, late_a, late_v) == 1
    assert len(loaded) == 100 and loaded.refresh(tmp_path) and len(loaded) == 110
    assert not loaded.refresh(tmp_path)  # nothing new
    assert np.allclose(loaded.vector(late_ids[3], "audio"), vindex.unit_rows(late_a)[3])
    # merged over parts: the same answer as one part holding every row
    every_v = np.vstack([video, vindex.unit_rows(late_v)])
    every_ids = ids + late_ids
    expected = [every_ids[i] for i in np.argsort(-(every_v @ audio[5]))[:8]]
    assert [h.clip_id for h in loaded.search(audio[5], "video", 8)] == expected
    meta = json.loads((tmp_path / "1.1" / "meta.json").read_text())
    assert (meta["parts"], meta["count"]) == (2, 110)
    rewritten_ids, _, _ = _write(tmp_path, "1.1", 5, seed=3)  # a full pass starts over
    loaded.refresh(tmp_path)
    assert loaded.ids == rewritten_ids
