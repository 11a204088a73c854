"""What a benchmark invocation runs: the continual budget, the sequences' sizes, the modes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.avdigits import AVDigitsConfig
from bench.continual.sequences import LocalizedSetConfig, SyntheticConfig
from worker.core.localized import LocalizedConfig
from worker.core.pretrain import PretrainConfig

RESULTS = Path(__file__).resolve().parent.parent / "results"
METHODS = ("finetune", "er", "derpp", "lump", "flava", "flava+", "flava-noimp", "flava-nocorr")
MULTITASK = "multitask"
FLAVA_FAMILY = ("flava", "flava+", "flava-noimp", "flava-nocorr")
# (ours, baseline) pairs compared seed by seed
PAIRS = (("flava", "derpp"), ("flava", "er"), ("flava", "flava-noimp"), ("flava", "flava-nocorr"))
# backbone 800 updates of 8 clips at contrastive weight 0.1, AVM 2,500 updates of 16: the
# pretraining behind bench/results/continual/ (703 s per seed there, table.md)
BENCH_PRETRAIN = PretrainConfig(steps=800, batch=8, nce_weight=0.1, avm_steps=2500)


@dataclass(frozen=True)
class TrainConfig:
    """The continual budget and optimisation, the same for every method."""

    preset: str = "tiny"  # model preset (pretraining uses the same)
    batch: int = 8  # current clips per step (replay methods add as many replayed clips)
    steps_per_task: int = 50  # updates per task (multitask: this x number of tasks)
    lr: float = 1e-4  # Adam, constant (paper)
    memory_size: int = 96  # replay memory capacity in clips
    eval_chunk: int = 32  # clips per embedding batch at evaluation
    threads: int = 1  # torch threads per run (runs go in parallel, one per core)
    # FLAVA's gate: selection switches on when the EMA of the AVM's matching accuracy on the
    # current batches reaches this. The protocol pretrains the AVM and the authors select from
    # the first step, so 0.5 = "on at once" (with the cold-stream default, 0.7, the gate never
    # opened on the synthetic stream and flava ran as finetune).
    warmup_acc: float = 0.5

    @property
    def multitask_batch(self) -> int:
        """Clips per multitask update: as many as a replay method's (current + replayed)."""
        return 2 * self.batch


@dataclass(frozen=True)
class EfficiencyConfig:
    warmup_steps: int = 15  # fill the replay memory and allocate the optimizer state first
    timed_steps: int = 15  # then time these and take their peak RSS


@dataclass
class BenchConfig:
    mode: str = "full"
    sequences: tuple[str, ...] = ("localized", "synthetic", "avdigits")
    methods: tuple[str, ...] = (*METHODS, MULTITASK)
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    seeds_by_sequence: dict[str, tuple[int, ...]] = field(default_factory=dict)  # overrides
    probe_methods: tuple[str, ...] = FLAVA_FAMILY  # AVM diagnostics after each task
    localized: LocalizedSetConfig = field(default_factory=LocalizedSetConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    avdigits: AVDigitsConfig = field(default_factory=AVDigitsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # seed set per run seed. The budget of the committed full run, not PretrainConfig's
    # defaults (the builtin start's, about 5x longer)
    pretrain: PretrainConfig = field(default_factory=lambda: BENCH_PRETRAIN)
    # a `flava pretrain` weights file every seed starts from instead of its own pretraining:
    # an exploratory view (e.g. from the builtin start's longer budget), not the protocol, since
    # seeds that share a start understate the spread
    start: Path | None = None
    workers: int = 2  # processes in parallel
    fresh_processes: bool = True  # one new process per job (clean peak RSS; ~3 s each)
    out_dir: Path = RESULTS / "continual"
    cache_dir: Path = RESULTS / "cache"
    resume: bool = False  # reuse finished runs (same job config) found in out_dir/runs
    efficiency: EfficiencyConfig | None = field(default_factory=EfficiencyConfig)  # None: skip

    def seeds_for(self, sequence: str) -> tuple[int, ...]:
        return self.seeds_by_sequence.get(sequence, self.seeds)

    def pretrain_config(self, seed: int) -> PretrainConfig:
        """Every seed gets its own pretraining, with the continual runs' preset."""
        return dataclasses.replace(self.pretrain, seed=seed, preset=self.train.preset)


def quick_config(**overrides: Any) -> BenchConfig:
    """Under a minute: a few clips and steps, the methods the paired comparisons need, 2 seeds."""
    cfg = BenchConfig(
        mode="quick",
        sequences=("localized",),
        methods=("er", "derpp", "flava", "flava-noimp", "flava-nocorr", MULTITASK),
        seeds=(0, 1),
        localized=LocalizedSetConfig(
            scene=LocalizedConfig(num_tasks=2),
            train_per_task=8,
            eval_per_task=6,
            pretrain_train=8,
            pretrain_eval=6,
        ),
        synthetic=SyntheticConfig(
            num_tasks=2,
            classes_per_task=2,
            pretrain_classes=2,
            train_per_task=16,
            eval_per_task=8,
            pretrain_train=16,
            pretrain_eval=8,
        ),
        avdigits=AVDigitsConfig(
            task_digits=((0, 1), (2, 3)),
            train_per_task=16,
            eval_per_task=8,
            pretrain_train=16,
            pretrain_eval=8,
        ),
        probe_methods=("flava",),
        train=TrainConfig(steps_per_task=2, batch=4, memory_size=8, eval_chunk=16),
        pretrain=PretrainConfig(steps=3, avm_steps=3, batch=4, avm_batch=4),
        fresh_processes=False,
        efficiency=None,
        out_dir=RESULTS / "continual" / "quick",
    )
    return dataclasses.replace(cfg, **overrides)


def full_config(**overrides: Any) -> BenchConfig:
    """The committed run: every method, five seeds on localized, three on synthetic, one on
    AV-Digits (not learnt by `tiny` at this budget: every method at chance)."""
    cfg = BenchConfig(
        mode="full",
        seeds_by_sequence={"synthetic": (0, 1, 2), "avdigits": (0,)},
        # diagnostics cost ~4 s per task set per evaluation at tiny: flava only (its ablations
        # report frac_excluded from their steps)
        probe_methods=("flava",),
    )
    return dataclasses.replace(cfg, **overrides)
