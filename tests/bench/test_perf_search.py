"""bench/perf_search.py on a small index: the HNSW side is really searched and compared."""

from __future__ import annotations

from bench.perf_search import SearchBenchConfig, markdown, run
from contract import index as vindex


def test_the_search_benchmark_compares_hnsw_with_exact(tmp_path):
    cfg = SearchBenchConfig(count=vindex.ANN_MIN + 500, dim=16, clusters=50, queries=20)
    result = run(cfg)
    assert 0.9 <= result["recall_at_k"] <= 1.0  # HNSW found (nearly) the exact top 10
    assert result["latency_ms"]["exact"]["p50"] > 0 and result["latency_ms"]["hnsw"]["p50"] > 0
    assert result["index_bytes"] > cfg.count * cfg.dim * 4 * 2  # both modalities' vectors
    assert "recall@10" in markdown(result)
