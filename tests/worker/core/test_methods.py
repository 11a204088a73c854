"""Continual methods on the tiny preset: steps, seeds, token budgets, AVM isolation, memory."""

from __future__ import annotations

import io
import math

import pytest
import torch

from worker.core.learner import Batch, LearnerConfig, build_learner
from worker.core.methods import Flava, beta_sample
from worker.core.model import ModelConfig, preset
from worker.core.selection import keep_count

METHODS = ["er", "derpp", "lump", "flava", "flava+", "flava-noimp", "flava-nocorr"]
SELECT_NOW = {"warmup_acc": 0.0}  # selection from the first step (as with a pretrained AVM)


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return preset("tiny")


def make_batch(cfg: ModelConfig, n: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        fbank=torch.randn(n, cfg.audio_frames, cfg.mel_bins, generator=g),
        frames=torch.randn(n, cfg.num_frames, 3, cfg.frame_size, cfg.frame_size, generator=g),
        ids=[f"c{seed}-{i}" for i in range(n)],
    )


def learner_for(name: str, cfg: ModelConfig, seed: int = 0, **options: object):
    opts = {**SELECT_NOW, **options} if name.startswith("flava") else {}
    return build_learner(name, cfg, LearnerConfig(seed=seed, memory_size=8, options=opts))


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in module.parameters()]


def changed(before: list[torch.Tensor], module: torch.nn.Module) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters(), strict=True))


@pytest.mark.parametrize("name", METHODS)
def test_steps_are_finite_update_and_fill_memory(name: str, cfg: ModelConfig) -> None:
    learner = learner_for(name, cfg)
    for seed in range(2):
        before = snapshot(learner.model)
        stats = learner.step(make_batch(cfg, seed=seed))
        assert math.isfinite(stats.loss) and not stats.skipped and stats.grad_norm > 0
        assert changed(before, learner.model)
        assert stats.batch_size == 3 and stats.memory_fill == 3 * (seed + 1)
        assert stats.replay_size == (3 if seed else 0)
    assert stats.memory_bytes == learner.memory.nbytes() > 0


def test_flava_seeded_steps_repeat_exactly(cfg: ModelConfig) -> None:
    runs = []
    for _ in range(2):
        learner = learner_for("flava", cfg, seed=5)
        losses = [learner.step(make_batch(cfg, seed=s)).loss for s in range(2)]
        runs.append((losses, snapshot(learner.model) + snapshot(learner.avm)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def _record_token_counts(learner: Flava) -> dict[str, list[int]]:
    """Sequence lengths entering the encoder's first audio block and the decoder."""
    seen: dict[str, list[int]] = {"enc_a": [], "enc_v": [], "dec": [], "pred_a": []}

    def hook(key: str):
        return lambda _m, args: seen[key].append(args[0].shape[1])

    learner.model.blocks_a[0].register_forward_pre_hook(hook("enc_a"))
    learner.model.blocks_v[0].register_forward_pre_hook(hook("enc_v"))
    learner.model.decoder_blocks[0].register_forward_pre_hook(hook("dec"))
    learner.model.decoder_pred_a.register_forward_pre_hook(hook("pred_a"))
    return seen


@pytest.mark.parametrize("name", ["flava", "flava+", "flava-noimp"])
def test_encoder_and_decoder_see_only_the_selected_tokens(name: str, cfg: ModelConfig) -> None:
    learner = learner_for(name, cfg)
    seen = _record_token_counts(learner)
    la, lv = cfg.num_audio_tokens, cfg.num_video_tokens
    ka, kv = keep_count(la, 0.5), keep_count(lv, 0.5)
    for seed in range(2):  # the second step replays stored clips
        stats = learner.step(make_batch(cfg, seed=seed))
        assert (stats.tokens_kept_a, stats.tokens_kept_v) == (ka, kv)
    # each step: the no-grad pass over all tokens, then the backbone over the selected ones
    assert seen["enc_a"] == [la, cfg.n_visible(la)] * 2
    assert seen["enc_v"] == [lv, cfg.n_visible(lv)] * 2
    assert seen["dec"] == [ka, kv] * 2  # visible + targets = the selected set, per modality
    assert seen["pred_a"] == [ka - cfg.n_visible(la)] * 2


def test_warmup_steps_use_all_tokens_until_the_avm_is_accurate(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg, warmup_acc=0.7)
    seen = _record_token_counts(learner)
    stats = learner.step(make_batch(cfg))
    assert not stats.selection and learner.selection_step is None
    assert stats.tokens_kept_a == cfg.num_audio_tokens and stats.replay_size == 0
    assert seen["dec"] == [cfg.num_audio_tokens, cfg.num_video_tokens]
    assert len(learner.memory) == 3  # memory fills during warm-up
    for _ in range(30):
        learner._update_warmup(1.0)
    assert learner.selection_step == learner.step_count == 1
    stats = learner.step(make_batch(cfg, seed=1))
    assert stats.selection and stats.tokens_kept_a == keep_count(cfg.num_audio_tokens, 0.5)


def test_warmup_ignores_batches_without_negatives(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg, warmup_acc=0.7, acc_momentum=0.0)
    with torch.no_grad():  # a head that always says "match": right on every all-positive batch
        learner.avm.head[2].bias.fill_(50.0)
    learner.step(make_batch(cfg, n=2))
    assert learner.acc_ema == 0.5 and learner.selection_step is None
    learner.step(make_batch(cfg, n=4))  # 2 negatives, all called matches: accuracy 0.5
    assert learner.acc_ema == 0.5 and learner.selection_step is None


def test_random_warmup_replays_at_the_selection_budget(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg, warmup_acc=0.99, warmup="random")
    learner.step(make_batch(cfg))
    stats = learner.step(make_batch(cfg, seed=1))
    assert not stats.selection and stats.replay_size == 3
    assert stats.tokens_kept_v == keep_count(cfg.num_video_tokens, 0.5)
    with pytest.raises(ValueError, match="warmup"):
        learner_for("flava", cfg, warmup="never")


def test_avm_loss_reaches_only_avm_parameters(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg)
    align = learner.alignment_pass(make_batch(cfg, n=6))
    align.match.loss.backward()
    assert all(p.grad is None for p in learner.model.parameters())
    assert all(p.grad is not None for p in learner.avm.parameters())
    assert align.match.labels.sum() == 3  # half true pairs, half deranged


def test_flava_loss_is_the_sum_of_its_terms(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg)
    first = learner.step(make_batch(cfg))
    assert first.loss_der == 0 and first.loss_avm > 0 and 0 <= first.avm_acc <= 1
    s = learner.step(make_batch(cfg, seed=1))
    want = s.loss_rec_a + s.loss_rec_v + 0.1 * s.loss_nce + s.loss_avm + 0.5 * s.loss_der
    assert s.loss_der > 0 and s.loss == pytest.approx(want, rel=1e-5)
    assert s.selection and 0 < s.frac_excluded < 1


def test_derpp_distills_only_with_replay(cfg: ModelConfig) -> None:
    learner = learner_for("derpp", cfg)
    assert learner.step(make_batch(cfg)).loss_der == 0
    s = learner.step(make_batch(cfg, seed=1))
    want = s.loss_rec_a + s.loss_rec_v + 0.1 * s.loss_nce + 0.5 * s.loss_der
    assert s.loss_der > 0 and s.loss == pytest.approx(want, rel=1e-5)


def test_nocorr_excludes_nothing(cfg: ModelConfig) -> None:
    learner = learner_for("flava-nocorr", cfg)
    for seed in range(2):
        stats = learner.step(make_batch(cfg, seed=seed))
    assert stats.frac_excluded == 0 and stats.selection
    assert learner.memory.read(torch.arange(3))["C_v"].abs().sum() == 0


def test_memory_contents_and_patches_only_halves_it(cfg: ModelConfig) -> None:
    full, plus = learner_for("flava", cfg), learner_for("flava+", cfg)
    for learner in (full, plus):
        learner.step(make_batch(cfg))
    assert set(full.memory.fields) == {
        *("fbank", "frames", "emb_a", "emb_v", "q_a_hat", "q_v_hat"),
        *("C_a", "C_v", "I_a", "I_v"),
    }
    assert {"tokens_a", "ids_a", "tokens_v", "ids_v"} <= set(plus.memory.fields)
    assert "fbank" not in plus.memory.fields
    assert 0.45 < plus.memory.nbytes() / full.memory.nbytes() < 0.55
    stored = plus.memory.read(torch.arange(3))
    batch = make_batch(cfg)
    tokens = plus.model.patchify_audio(batch.fbank)
    ids = stored["ids_a"]
    assert torch.equal(stored["tokens_a"], tokens.gather(1, ids[..., None].expand(-1, -1, 256)))


def test_flava_plus_rebuilds_stored_patches_in_place(cfg: ModelConfig) -> None:
    learner = learner_for("flava+", cfg)
    batch = make_batch(cfg)
    learner.step(batch)
    replay = learner.sample_replay(3)
    fbank, _ = learner.replay_clips(replay)
    order = [int(i) for i in replay.slots]  # slot i holds clip i of the first batch
    rebuilt = learner.model.patchify_audio(fbank)
    ids = replay.items["ids_a"]
    original = learner.model.patchify_audio(batch.fbank[order])
    kept = ids[..., None].expand(-1, -1, rebuilt.shape[-1])
    assert torch.equal(rebuilt.gather(1, kept), original.gather(1, kept))
    assert rebuilt.abs().sum() == rebuilt.gather(1, kept).abs().sum()  # zeros elsewhere


def test_pre_update_embeddings_match_embed_before_the_step(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg)
    batch = make_batch(cfg)
    want_a, want_v = learner.embed(batch)
    learner.step(batch)
    pre = learner.pre_update
    assert pre is not None and pre.step == 0 and pre.ids == batch.ids
    torch.testing.assert_close(pre.emb_a, want_a)
    torch.testing.assert_close(pre.emb_v, want_v)
    assert not torch.allclose(learner.embed(batch)[0], want_a)  # the update changed them


def test_pre_update_embeddings_off_skip_the_pass_and_train_the_same(cfg: ModelConfig) -> None:
    on, off = learner_for("flava", cfg), learner_for("flava", cfg, pre_update_embeddings=False)
    batch = make_batch(cfg)
    on.step(batch)
    off.step(batch)
    assert on.pre_update is not None and off.pre_update is None
    assert not changed(snapshot(on.model), off.model)  # the same update either way


def test_flava_checkpoint_resumes_exactly(cfg: ModelConfig) -> None:
    first = learner_for("flava", cfg, seed=1, warmup_acc=0.6)
    for seed in range(2):
        first.step(make_batch(cfg, seed=seed))
    first._update_warmup(1.0)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    second = learner_for("flava", cfg, seed=2, warmup_acc=0.6)
    second.load_state_dict(torch.load(buf, weights_only=True))
    assert len(second.memory) == 6 and second.acc_ema == first.acc_ema
    assert second.selection_step == first.selection_step
    a, b = first.step(make_batch(cfg, seed=9)), second.step(make_batch(cfg, seed=9))
    assert a.loss == b.loss and not changed(snapshot(first.model), second.model)


def test_lump_beta_draws_are_reproducible_and_u_shaped() -> None:
    draws = [beta_sample(0.5, torch.Generator().manual_seed(s)) for s in range(2000)]
    assert beta_sample(0.5, torch.Generator().manual_seed(3)) == draws[3]
    low = sum(d < 0.1 for d in draws) / len(draws)
    assert abs(low - 0.2048) < 0.04  # arcsine CDF at 0.1 = 2/pi asin(sqrt(0.1))


def test_lump_mixes_current_with_replay(cfg: ModelConfig) -> None:
    learner = learner_for("lump", cfg)
    learner.step(make_batch(cfg))
    batch = make_batch(cfg, seed=1)
    replay = learner.sample_replay(3)
    fbank, _ = learner.mixed(batch, replay)
    other = replay.items["fbank"]
    lam = (fbank - other) / (batch.fbank - other)  # one lambda for every element
    assert 0 < float(lam.median()) < 1
    torch.testing.assert_close(fbank, lam.median() * batch.fbank + (1 - lam.median()) * other)
