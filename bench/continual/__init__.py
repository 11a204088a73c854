"""The continual benchmark: the paper's protocol (docs/architecture.md; docs/design.md section 5) on
data we can generate here.

Per task sequence (``localized``, ``synthetic``, AV-Digits; sequences.py):

1. Pretrain on a separate distribution: the backbone, then the AVM with the backbone frozen
   (worker.core.pretrain). Every seed has its own pretraining, cached on disk, and every
   method of that seed starts from it.
2. Each method learns the tasks one after another from batches of the task's training clips;
   it never sees a task boundary. Multitask (all tasks jointly, as many updates with as many
   clips per update as a replay method) is the upper bound.
3. After each task l, every task k's held-out clips query the union of all tasks' held-out
   sets (probes.py, metrics.py): R[l][k] with instance-level hits, R@1/5/10, a->v and v->a;
   chance R@K = K / gallery size. Label-level hits inside each task's set are a second view.
4. A = mean of the final row, F = 1/(T-1) sum_{k<T} max_{l<T} (R[l][k] - R[T][k]);
   mean, std and paired tests over seeds (aggregate.py). The AVM's matching accuracy and
   localization AUC (with a shuffled-audio control) after pretraining and after each task.

Modules: config (budgets, modes), sequences (clips, cache), metrics (the figures), probes
(evaluation and AVM diagnostics), runs (the jobs), benchmark (orchestration), aggregate (over
seeds, summary.json), report (markdown, plots), cli.

Run: ``python -m bench.continual --mode quick|full [--sequences localized] [--resume]``.
"""

from bench.continual.benchmark import run_benchmark
from bench.continual.cli import main
from bench.continual.config import (
    FLAVA_FAMILY,
    METHODS,
    MULTITASK,
    BenchConfig,
    EfficiencyConfig,
    TrainConfig,
    full_config,
    quick_config,
)
from bench.continual.sequences import LocalizedSetConfig, SyntheticConfig
from worker.core.pretrain import PretrainConfig

__all__ = [
    "FLAVA_FAMILY",
    "METHODS",
    "MULTITASK",
    "BenchConfig",
    "EfficiencyConfig",
    "LocalizedSetConfig",
    "PretrainConfig",
    "SyntheticConfig",
    "TrainConfig",
    "full_config",
    "main",
    "quick_config",
    "run_benchmark",
]
