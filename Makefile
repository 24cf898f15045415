# Two commands on a fresh machine:  `make demo` runs the main job (the live demo: server + streamed sample),
# `make test` runs the tests.
# Both create .venv on first use. CPU torch is installed first and pinned: a bare `torch` requirement resolves to a
# multi-GB CUDA build. Override TORCH for another build, e.g. TORCH="torch==2.13.0 --index-url <cpu index>".
PYTHON ?= python3
TORCH ?= torch==2.13.0
# Optional extras the test run installs (dtx: the VAD of codec --dtx; opus: PyAV for the Opus uplink); CI adds ray so the Ray tests run (they are
# skipped without it).
EXTRAS ?= test,plot,dtx,opus
VENV := .venv
BIN := $(VENV)/bin

# The GPU check (scripts/gpu_check.sh): `make gpu-wheels` here (network) puts the wheels a GPU image may lack into the
# git-ignored .whl/ (for that machine's Python, GPU_PYTHON); carry .whl/ to the GPU machine and run `make gpu-check`
# there (no network needed). Without a CUDA device gpu-check is a dry run.
GPU_PYTHON ?= 3.12
GPU_WHEELS ?= soundfile cffi pycparser websockets

.PHONY: demo test typecheck install bench clean gpu-wheels gpu-check mutants

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(BIN)/.installed

demo: $(BIN)/.installed
	$(BIN)/dpslm-stream live --resynth out/live_resynth.wav

# The server core, protocol and backend interfaces (files: pyproject's [tool.mypy]).
typecheck: $(BIN)/.installed
	$(BIN)/python -m mypy

test: typecheck
	$(BIN)/python -m pytest -q

gpu-wheels:
	mkdir -p .whl
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version $(GPU_PYTHON) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
		--platform manylinux1_x86_64 --platform any -d .whl $(GPU_WHEELS)

gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf $(VENV) build *.egg-info

# Mutation testing of the core modules (docs/mutation.md), one group per call: `make mutants MODULES=dpdp`
# (groups: pyproject's [tool.dpslm-mutants.groups]; MODULES=all runs every group). SAMPLE=N tests a deterministic
# 1/N sample of the mutants. Not part of `make test`/CI: it takes minutes to tens of minutes per group on 2 cores.
MODULES ?= dpdp
SAMPLE ?= 1
mutants: $(BIN)/.installed
	$(BIN)/pip install -q -e ".[mutation]"
	$(BIN)/python scripts/mutants.py --modules $(MODULES) --sample $(SAMPLE)
