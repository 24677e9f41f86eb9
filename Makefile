# The README's commands. `make setup` installs (CPU torch first where none is present),
# `make prune` runs the main job on the embedded default, `make test` runs lint and the tests.
PYTHON ?= python3
EXTRAS ?= dev,train,serve,triton

.PHONY: setup prune test lint bench gpu-check

setup:
	$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	$(PYTHON) -m pip install -e ".[$(EXTRAS)]"

prune:
	rpp-triton prune --output-dir runs/minilm-rpp --overwrite

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: lint
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} TRITON_INTERPRET=1 $(PYTHON) -m pytest tests -q

bench:
	$(PYTHON) -m pytest bench -q --benchmark-columns=median,iqr,rounds

gpu-check:
	bash bench/gpu_check.sh bench/results/latest
