"""FLAVA (worker/core/flava.py) on the tiny preset: the gate, token budgets, AVM isolation and
its optimizer group, memory contents, the worker's interface, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch

from tests.worker.core.method_fixtures import changed, learner_for, make_batch, snapshot
from worker.core.flava import Flava, SelectionGate
from worker.core.learner import SelectionState
from worker.core.model import ModelConfig, preset
from worker.core.selection import keep_count

SCORES = {"C_a", "C_v", "I_a", "I_v", "q_a_hat", "q_v_hat", "emb_a", "emb_v"}


@pytest.fixture(scope="module")
def cfg() -> ModelConfig:
    return preset("tiny")


def test_flava_seeded_steps_repeat_exactly(cfg: ModelConfig) -> None:
    runs = []
    for _ in range(2):
        learner = learner_for("flava", cfg, seed=5)
        losses = [learner.step(make_batch(cfg, seed=s)).loss for s in range(2)]
        runs.append((losses, snapshot(learner.model) + snapshot(learner.avm)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1], strict=True))


def _record_token_counts(learner: Flava) -> dict[str, list[tuple[int, int]]]:
    """(batch, sequence length) entering the first encoder blocks and the decoder."""
    seen: dict[str, list[tuple[int, int]]] = {"enc_a": [], "enc_v": [], "dec": [], "pred_a": []}

    def hook(key: str):
        return lambda _m, args: seen[key].append(tuple(args[0].shape[:2]))

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
    assert [n for _, n in seen["enc_a"]] == [la, cfg.n_visible(la)] * 2
    assert [n for _, n in seen["enc_v"]] == [lv, cfg.n_visible(lv)] * 2
    assert [n for _, n in seen["dec"]] == [ka, kv] * 2  # visible + targets = the selected set
    assert [n for _, n in seen["pred_a"]] == [ka - cfg.n_visible(la)] * 2


def test_cold_start_steps_replay_all_tokens_and_distill(cfg: ModelConfig) -> None:
    """Gate closed (a fresh AVM): full-token DER++ steps on current + replayed clips."""
    learner = learner_for("flava", cfg, warmup_acc=0.7)
    seen = _record_token_counts(learner)
    first = learner.step(make_batch(cfg))
    assert not first.selection and first.replay_size == 0 and first.loss_der == 0
    assert learner.selection_state() == SelectionState(learner.gate.acc_ema, None)
    stats = learner.step(make_batch(cfg, seed=1))
    assert not stats.selection and stats.replay_size == 3 and stats.loss_der > 0
    la, lv = cfg.num_audio_tokens, cfg.num_video_tokens
    assert (stats.tokens_kept_a, stats.tokens_kept_v) == (la, lv)
    assert seen["dec"][-2:] == [(6, la), (6, lv)]  # 3 current + 3 replayed, every token
    want = stats.loss_rec_a + stats.loss_rec_v + 0.1 * stats.loss_nce + stats.loss_avm
    assert stats.loss == pytest.approx(want + 0.5 * stats.loss_der, rel=1e-5)
    assert SCORES <= set(learner.memory.fields)  # what later selection reads
    assert learner.memory.read(torch.arange(6))["I_v"].sum(1).allclose(torch.ones(6))


def test_cold_start_der_term_changes_the_backbone_gradient_only(cfg: ModelConfig) -> None:
    with_der = learner_for("flava", cfg, warmup_acc=0.7)
    without = learner_for("flava", cfg, warmup_acc=0.7, der_alpha=0.0)
    for learner in (with_der, without):
        learner.step(make_batch(cfg))
    a, b = with_der.step(make_batch(cfg, seed=1)), without.step(make_batch(cfg, seed=1))
    assert a.loss_rec_a == b.loss_rec_a and a.loss_der == b.loss_der > 0  # same batch, plan
    grads = [
        (p.grad, q.grad)
        for p, q in zip(with_der.model.parameters(), without.model.parameters(), strict=True)
    ]
    assert any(not torch.equal(g, h) for g, h in grads if g is not None)
    avm = zip(with_der.avm.parameters(), without.avm.parameters(), strict=True)
    assert all(torch.equal(p.grad, q.grad) for p, q in avm)


def test_flava_plus_cold_start_stores_random_keep_sets_and_replays_them(cfg: ModelConfig) -> None:
    learner = learner_for("flava+", cfg, warmup_acc=0.99)
    learner.step(make_batch(cfg))
    stats = learner.step(make_batch(cfg, seed=1))
    assert not stats.selection and stats.replay_size == 3 and stats.loss_der > 0
    ka = keep_count(cfg.num_audio_tokens, 0.5)
    assert stats.tokens_kept_a == ka and learner.memory.read(torch.arange(6))["ids_a"].shape == (
        6,
        ka,
    )


def test_gate_switches_selection_on_once_the_avm_is_accurate(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg, warmup_acc=0.7)
    learner.step(make_batch(cfg))
    for _ in range(30):
        learner.gate.observe(1.0, learner.step_count)
    state = learner.selection_state()
    assert state.on and state.selection_step == learner.step_count == 1
    assert state.avm_accuracy_ema >= 0.7
    stats = learner.step(make_batch(cfg, seed=1))
    assert stats.selection and stats.tokens_kept_a == keep_count(cfg.num_audio_tokens, 0.5)
    assert learner.selection_step == 1  # for good: it does not move later


def test_gate_at_or_below_chance_is_open_from_the_start(cfg: ModelConfig) -> None:
    assert learner_for("flava", cfg, warmup_acc=0.5).selection_state().selection_step == 0
    gate = SelectionGate(threshold=0.7, momentum=0.5)
    gate.observe(0.8, step=3)
    assert not gate.on and gate.acc_ema == pytest.approx(0.65)
    gate.observe(0.8, step=4)
    assert gate.on and gate.selection_step == 4


def test_gate_ignores_batches_without_negatives(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg, warmup_acc=0.7, acc_momentum=0.0)
    with torch.no_grad():  # a head that always says "match": right on every all-positive batch
        learner.avm.head[2].bias.fill_(50.0)
    learner.step(make_batch(cfg, n=2))
    assert learner.gate.acc_ema == 0.5 and learner.selection_step is None
    learner.step(make_batch(cfg, n=4))  # 2 negatives, all called matches: accuracy 0.5
    assert learner.gate.acc_ema == 0.5 and learner.selection_step is None


def test_avm_has_its_own_optimizer_group_and_learning_rate(cfg: ModelConfig) -> None:
    learner = learner_for("flava", cfg, lr=2e-4, avm_lr=3e-3)
    groups = {g["name"]: g for g in learner.optimizer.param_groups}
    assert set(groups) == {"backbone", "avm"}
    assert groups["backbone"]["lr"] == 2e-4 and groups["avm"]["lr"] == 3e-3
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["avm"] == {id(p) for p in learner.avm.parameters()}
    assert ids["backbone"] == {id(p) for p in learner.model.parameters()}


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
    assert set(full.memory.fields) == {"fbank", "frames", *SCORES}
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


def test_step_embeddings_match_embed_before_the_step_and_are_taken_once(
    cfg: ModelConfig,
) -> None:
    learner = learner_for("flava", cfg)
    batch = make_batch(cfg)
    want_a, want_v = learner.embed(batch)
    learner.step(batch)
    pre = learner.take_step_embeddings()
    assert pre is not None and pre.step == 0 and pre.ids == batch.ids
    assert learner.take_step_embeddings() is None
    torch.testing.assert_close(pre.emb_a, want_a)
    torch.testing.assert_close(pre.emb_v, want_v)
    assert not torch.allclose(learner.embed(batch)[0], want_a)  # the update changed them


def test_step_embeddings_off_skip_the_pass_and_train_the_same(cfg: ModelConfig) -> None:
    on, off = learner_for("flava", cfg), learner_for("flava", cfg, pre_update_embeddings=False)
    batch = make_batch(cfg)
    on.step(batch)
    off.step(batch)
    assert on.take_step_embeddings() is not None and off.take_step_embeddings() is None
    assert not changed(snapshot(on.model), off.model)  # the same update either way


def _saved(learner: Flava) -> dict:
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_flava_checkpoint_resumes_exactly(cfg: ModelConfig) -> None:
    first = learner_for("flava", cfg, seed=1, warmup_acc=0.6)
    for seed in range(2):
        first.step(make_batch(cfg, seed=seed))
    for _ in range(5):
        first.gate.observe(1.0, first.step_count)
    second = learner_for("flava", cfg, seed=2, warmup_acc=0.6)
    second.load_state_dict(_saved(first))
    assert len(second.memory) == 6 and second.selection_state() == first.selection_state()
    assert second.selection_step == first.selection_step == 2
    a, b = first.step(make_batch(cfg, seed=9)), second.step(make_batch(cfg, seed=9))
    assert a.loss == b.loss and not changed(snapshot(first.model), second.model)


def test_checkpoint_from_before_the_avm_group_loads_with_configured_rates(
    cfg: ModelConfig,
) -> None:
    """Older checkpoints had one optimizer group over backbone + AVM, in the same order."""
    first = learner_for("flava", cfg, seed=1)
    for seed in range(2):
        first.step(make_batch(cfg, seed=seed))
    state = _saved(first)
    backbone, avm = state["optimizer"]["param_groups"]
    one = {k: v for k, v in backbone.items() if k != "name"}
    state["optimizer"]["param_groups"] = [{**one, "params": backbone["params"] + avm["params"]}]
    second = learner_for("flava", cfg, seed=2)
    second.load_state_dict(state)
    rates = [(g["name"], g["lr"]) for g in second.optimizer.param_groups]
    assert rates == [("backbone", 1e-4), ("avm", 1e-3)]
    a, b = first.step(make_batch(cfg, seed=9)), second.step(make_batch(cfg, seed=9))
    assert a.loss == b.loss and not changed(snapshot(first.avm), second.avm)
