# Two commands on a fresh machine: `make demo` and `make test`. Each creates/updates .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test lint typecheck lock bench-continual bench-perf bench-chaos clean

$(STAMP): pyproject.toml requirements/torch.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: this exact version is a CPU build on this machine's disk, and it then
	# meets pyproject's torch range; resolved from the range alone pip would pull a CUDA build
	$(PY) -m pip install -q -r requirements/torch.txt
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m flava demo

# the tests also need redis-server and prometheus: installed if missing, Redis started
test: $(STAMP)
	scripts/test-deps.sh
	$(PY) -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check service worker contract flava bench tests
	$(VENV)/bin/ruff format --check service worker contract flava bench tests

typecheck: $(STAMP)
	$(VENV)/bin/mypy service worker contract

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache

# The images' pinned sets (Dockerfile): requirements/api.txt and worker.txt, every package with
# its hashes, compiled from pyproject's extras by pip-tools (uv is not used: it does not see the
# CPU torch on our disk). torch itself is left out of worker.txt (the image takes the build its
# TORCH_VERSION and index name) but its dependencies are pinned as requirements/torch.txt's
# version needs them. Kept pins stay; LOCK_ARGS=--upgrade takes the newest allowed versions.
LOCK_ARGS ?=
LOCK := CUSTOM_COMPILE_COMMAND='make lock' $(VENV)/bin/pip-compile --quiet --generate-hashes \
	--strip-extras --no-emit-index-url --no-emit-find-links --constraint requirements/torch.txt \
	--unsafe-package torch $(LOCK_ARGS)
lock: $(STAMP)
	$(LOCK) --extra api --output-file requirements/api.txt pyproject.toml
	$(LOCK) --extra worker --output-file requirements/worker.txt pyproject.toml

# The continual benchmark (bench/continual/): every method side by side on the localized and
# synthetic sequences and AV-Digits; CONTINUAL_MODE=quick (under a minute) or full (the
# committed results; resumable: CONTINUAL_ARGS=--resume reuses finished runs).
CONTINUAL_MODE ?= full
CONTINUAL_ARGS ?=
bench-continual: $(STAMP)
	$(PY) -m bench.continual --mode $(CONTINUAL_MODE) $(CONTINUAL_ARGS)

# Performance side by side (bench/perf.py): decode vs ffmpeg, flava/er/finetune steps, service
# vs learner throughput, ingest vs raw Redis, embed reads -> bench/results/perf.{md,json,png}.
# PERF_ARGS=--quick for the two-minute version; bench/gpu.sh is the GPU part (needs a GPU).
PERF_ARGS ?=
bench-perf: $(STAMP)
	$(PY) -m bench.perf $(PERF_ARGS)

# The chaos run (bench/chaos.py): real API, worker and redis-server under the default checkpoint
# policy; worker and Redis SIGKILLs, a Redis restart without its data, a full checkpoint disk
# (a tmpfs: needs root, else reported skipped) -> bench/results/chaos.{json,md}. 10-20 minutes.
CHAOS_ARGS ?=
bench-chaos: $(STAMP)
	nice $(PY) -m bench.chaos $(CHAOS_ARGS)
