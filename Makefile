# One entry point for people and CI. `make smoke` runs the whole pipeline on the embedded
# default (real SmolLM2-135M, real Wikipedia text, small); `make test` runs lint and tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is installed first and pinned: on these CPU machines pip finds the local CPU build,
# on a GPU node the same pin pulls the CUDA build from PyPI. An unpinned install would
# drag several GB of CUDA packages onto a CPU machine.
TORCH_SPEC ?= torch==2.13.0

.PHONY: install smoke test lint bench clean

$(BIN)/pipeline: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $@

install: $(BIN)/pipeline

smoke: install
	$(BIN)/pipeline run manifests/experiments/smoke.yaml

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest -q

# Every stage's benchmark; each writes bench/results/<name>-<device>.json.
# (bench/vs_saelens.py builds its own SAELens venv first: run it by hand.)
bench: install
	$(BIN)/python bench/harvest.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/evaluate.py
	$(BIN)/python bench/scaling.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
