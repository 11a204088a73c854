"""bench/gpu.py's embedding batching mode, checked on the CPU at `tiny` (the GPU run uses
the same code with bf16 autocast): samples/s at each call size and their ratio in the JSON."""

from __future__ import annotations

import json

import pytest

from bench import gpu


def test_the_embedding_mode_writes_samples_per_s_and_the_ratio(tmp_path, one_thread):
    out = tmp_path / "gpu"
    argv = ["--device", "cpu", "--preset", "tiny", "--methods", ""]
    assert (
        gpu.main([*argv, "--embed-batches", "1,4", "--embed-rounds", "2", "--out", str(out)]) == 0
    )
    body = json.loads(out.with_suffix(".json").read_text())
    result = body["embed_batching"]
    assert (result["preset"], result["clips"], result["bf16_autocast"]) == ("tiny", 4, False)
    rates = result["samples_per_s"]
    assert set(rates) == {"1", "4"} and all(v > 0 for v in rates.values())
    assert result["ratio"] == pytest.approx(rates["4"] / rates["1"], rel=1e-2)
    assert body["results"] == []  # no learner method asked
    assert "Embedding model (tiny" in out.with_suffix(".md").read_text()


def test_without_embed_rounds_the_json_has_no_embedding_figure(tmp_path, one_thread):
    out = tmp_path / "gpu"
    argv = ["--device", "cpu", "--preset", "tiny", "--batch", "2", "--memory-size", "8"]
    argv += ["--warmup", "1", "--steps", "1", "--methods", "finetune", "--embed-rounds", "0"]
    assert gpu.main([*argv, "--out", str(out)]) == 0
    body = json.loads(out.with_suffix(".json").read_text())
    assert "embed_batching" not in body and body["results"][0]["method"] == "finetune"


def test_the_float32_sides_are_reported_beside_the_bf16_ones(one_thread):
    """On CUDA the JSON also holds the float32 figure (the embedder today); the code that
    makes and reports it, run here on the CPU where autocast is off on both."""
    cfg = gpu.GpuConfig(device="cpu", preset="tiny", embed_batches=(1, 2), embed_rounds=1)
    model = gpu.embed_batching.build_model("tiny", "cpu")
    clips = gpu.embed_batching.random_clips("tiny", 2)
    fp32 = gpu._embed_sides(cfg, model, clips, amp=False)
    assert set(fp32["samples_per_s"]) == {"1", "2"} and fp32["clips"] == 2
    result = {**gpu._embed_sides(cfg, model, clips, amp=True), "fp32": fp32}
    lines = gpu.embed_markdown({**result, "preset": "tiny", "bf16_autocast": False})
    assert lines[-1].startswith("The same in float32 (the embedder today): samples/s batch 1: ")
