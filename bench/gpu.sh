#!/usr/bin/env bash
# Benchmark 6 of issue 7: learner samples/s and peak GPU memory of finetune, er and flava at
# the paper's setting (base preset, batch 9, bf16 autocast, 2000-clip replay memory on the
# CPU), on one GPU. Prepared to finish in well under 8 minutes on an H100 (bounded by
# `timeout` below); writes bench/results/gpu.{json,md}.
#
# Needs a Python with a CUDA build of torch and numpy (the learning core imports nothing
# else): PY=/path/to/python bench/gpu.sh. Extra arguments go to `python -m bench.gpu`.
# To check the script without a GPU:
#   PY=.venv/bin/python bench/gpu.sh --device cpu --preset tiny --batch 2 --memory-size 16
#
# Multi-GPU mode (issue 16, docs/distributed.md): `bench/gpu.sh ranks [N]` runs the rank-group
# benchmark instead (python -m bench.perf_ranks): flava at base, batch 9 per GPU, 1 rank
# against N ranks (default: every GPU; NCCL, one GPU per rank, rounds alternating), plus the
# scaling model; writes bench/results/ranks-gpu/{ranks.json,summary.md}. Without GPUs:
#   DEVICE=cpu PRESET=tiny BATCH=2 PY=.venv/bin/python bench/gpu.sh ranks 2 --quick --no-model \
#     --steps 2 --out /tmp/ranks-check
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PY:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
if [[ "${1:-}" == "ranks" ]]; then
  gpus="${2:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}"
  shift $(( $# >= 2 ? 2 : 1 ))
  nvidia-smi topo -m 2>/dev/null || true  # NVLink or PCIe between the GPUs: it sets the all-reduce
  exec timeout 540 "$PY" -m bench.perf_ranks --device "${DEVICE:-cuda}" --preset "${PRESET:-base}" \
    --batch "${BATCH:-9}" --ranks "1,$gpus" --steps 20 --out bench/results/ranks-gpu "$@"
fi
timeout 450 "$PY" -m bench.gpu --device cuda --preset base --batch 9 --warmup 5 --steps 20 \
  --out bench/results/gpu "$@"
