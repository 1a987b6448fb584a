# The two commands of the README: `make run` (the demo pipeline) and `make test`.
# Both create the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: a bare `torch` requirement can pull a multi-GB CUDA build on a CPU machine.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed
ARGS ?=
PYTEST_ARGS ?=

.PHONY: install run test check bench gpu-check clean-work

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/lmpipe run $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Static checks: lint (style, imports, bug patterns) and types; both configured in pyproject.toml.
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy

# The benchmarks (bench/): cleaning against datatrove, sharding against the bare tokenizers encoder,
# peak memory on a 2 GB synthetic corpus, the training loop against a bare loop (BENCH_TRAIN_CONFIG: the
# demo on CPU; configs/gpt2-124m.yaml with --compile both on a GPU), what checking shards' sha256 on open
# costs against the demo's pretraining, what checking reused stages costs a cached re-run of the demo (in the
# demo's work directory, filled first if empty). datatrove is the cleaning baseline only, so it is installed here.
BENCH_MEMORY_GB ?= 2
BENCH_TRAIN_CONFIG ?= configs/demo.yaml
bench: $(STAMP)
	$(BIN)/pip install --quiet --disable-pip-version-check "datatrove==0.10.1" "spacy==3.8.18"
	$(BIN)/python -m bench.train --config $(BENCH_TRAIN_CONFIG)
	$(BIN)/python -m bench.clean
	$(BIN)/python -m bench.shard
	$(BIN)/python -m bench.memory --gigabytes $(BENCH_MEMORY_GB)
	$(BIN)/python -m bench.verify --config $(BENCH_TRAIN_CONFIG)
	$(BIN)/python -m bench.reuse

# On one CUDA GPU, in under 8 minutes: the gpu-smoke pipeline, CUDA paths, GPT-2 124M tokens/s and MFU per
# recipe (compiled and eager), the export's logits on CUDA, DDP where 2 GPUs exist; one JSON line per figure.
# Exit 0 all passed, 1 a part failed, 2 a preset is invalid, 3 no CUDA device (bench/gpu_check.py).
GPU_CHECK_ARGS ?=
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check $(GPU_CHECK_ARGS)

clean-work:
	rm -rf .lmpipe
