"""Search at scale: HNSW vs exact on one version's index (contract/index.py), side by side.

Issue 15 §3: "at 100,000 vectors of `base` width, p99 query latency and recall@10 against
exact search (>= 0.95), side by side with exact search". The index is written by the same
``write_index`` that ``flava reembed`` uses and searched by the same ``VersionIndex.search``
that ``/search`` uses; queries alternate between the two sides.

Vectors: not real embeddings (100,000 kept clips at `base` are beyond this CPU), but shaped
like them: a mixture of ``clusters`` Gaussian clusters (clips of one scene or source are near
each other) in ``dim`` dimensions, unit rows; queries are fresh draws from the same mixture.
Recall@10 = |HNSW top 10 ∩ exact top 10| / 10, averaged over the queries.

    python -m bench.perf_search                  # 100,000 x 768 (base), 500 queries
    python -m bench.perf_search --count 20000    # smaller
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from contract import index as vindex

RESULTS = Path(__file__).parent / "results" / "search"
BASE_DIM = 768  # worker.core.model.preset("base").dim


@dataclass
class SearchBenchConfig:
    count: int = 100_000
    dim: int = BASE_DIM
    clusters: int = 1000
    spread: float = 0.35  # within-cluster standard deviation relative to the centre's norm
    queries: int = 500
    k: int = 10
    seed: int = 0
    out: Path = RESULTS


def mixture(n: int, centres: np.ndarray, spread: float, rng: np.random.Generator) -> np.ndarray:
    """``n`` unit vectors drawn around random centres of the mixture."""
    picks = rng.integers(0, len(centres), n)
    noise = rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    noise *= spread / np.sqrt(centres.shape[1])
    return vindex.unit_rows(centres[picks] + noise)


def run(cfg: SearchBenchConfig) -> dict:
    rng = np.random.default_rng(cfg.seed)
    centres = vindex.unit_rows(rng.standard_normal((cfg.clusters, cfg.dim), dtype=np.float32))
    gallery = mixture(cfg.count, centres, cfg.spread, rng)
    queries = mixture(cfg.queries, centres, cfg.spread, rng)
    ids = [f"{i:064x}" for i in range(cfg.count)]
    with tempfile.TemporaryDirectory(prefix="flava-search-") as tmp:
        started = time.perf_counter()
        vindex.write_index(tmp, "0.1", ids, [""] * cfg.count, gallery, gallery)
        build_s = time.perf_counter() - started
        index = vindex.VersionIndex.load(tmp, "0.1")
        assert "video" in index.graphs, "the index is under ANN_MIN: no HNSW graph to compare"
        times: dict[str, list[float]] = {"exact": [], "hnsw": []}
        recalls = []
        for q in queries:
            found = {}
            for side in ("exact", "hnsw") if len(recalls) % 2 == 0 else ("hnsw", "exact"):
                t0 = time.perf_counter()
                hits = index.search(q, "video", cfg.k, exact=side == "exact")
                times[side].append(time.perf_counter() - t0)
                found[side] = {h.clip_id for h in hits}
            recalls.append(len(found["hnsw"] & found["exact"]) / cfg.k)
        size = sum(p.stat().st_size for p in Path(tmp, "0.1").rglob("*") if p.is_file())
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "build_s": round(build_s, 1),
        "index_bytes": size,
        "recall_at_k": round(statistics.fmean(recalls), 4),
        "recall_min": min(recalls),
        "latency_ms": {side: _stats(ts) for side, ts in times.items()},
        "speedup_p50": round(
            statistics.median(times["exact"]) / statistics.median(times["hnsw"]), 1
        ),
        "params": {
            "M": vindex.HNSW_M,
            "efConstruction": vindex.EF_CONSTRUCTION,
            "efSearch": vindex.EF_SEARCH,
        },
    }


def _stats(seconds: list[float]) -> dict:
    ms = sorted(s * 1000 for s in seconds)
    return {
        "p50": round(statistics.median(ms), 3),
        "p99": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 3),
        "max": round(ms[-1], 3),
    }


def markdown(r: dict) -> str:
    c, lat = r["config"], r["latency_ms"]
    return "\n".join(
        [
            "# Search: HNSW vs exact, one version's index",
            "",
            f"`python -m bench.perf_search --count {c['count']} --spread {c['spread']}`:"
            f" {c['count']:,} unit vectors of"
            f" {c['dim']} dimensions (`base` width; a mixture of {c['clusters']} clusters, not real"
            f" embeddings), {c['queries']} fresh queries, k = {c['k']}, one query at a time through"
            " `VersionIndex.search` (what `/search` runs), the two sides alternating per query."
            " 2-core CPU machine.",
            "",
            "| search | p50 ms | p99 ms | max ms | recall@10 vs exact |",
            "|---|---|---|---|---|",
            f"| exact (numpy, {c['count']:,} dot products) | {lat['exact']['p50']} |"
            f" {lat['exact']['p99']} | {lat['exact']['max']} | 1 (by definition) |",
            f"| HNSW (faiss, M={r['params']['M']}, efSearch={r['params']['efSearch']}) |"
            f" {lat['hnsw']['p50']} | {lat['hnsw']['p99']} | {lat['hnsw']['max']} |"
            f" {r['recall_at_k']} (worst query {r['recall_min']}) |",
            "",
            f"- exact / HNSW median latency: {r['speedup_p50']}x;"
            f" target recall@10 >= 0.95: {'met' if r['recall_at_k'] >= 0.95 else 'missed'}.",
            f"- Building the index (both modalities' vectors and graphs, as `flava reembed` does):"
            f" {r['build_s']} s; on disk {r['index_bytes'] / 1e6:.0f} MB.",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--dim", type=int, default=BASE_DIM)
    p.add_argument("--queries", type=int, default=500)
    p.add_argument("--spread", type=float, default=0.35, help="within-cluster spread")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cfg = SearchBenchConfig(
        count=args.count, dim=args.dim, queries=args.queries, spread=args.spread, out=args.out
    )
    result = run(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "search.json").write_text(json.dumps(result, indent=2) + "\n")
    (cfg.out / "search.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
