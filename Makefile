# ciea — set-up and the two commands every newcomer needs: `make demo` and `make test`.
# Both create the virtualenv on first use and reinstall only when pyproject.toml or
# constraints.txt change.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# torch goes in first so that the package's torch range does not pull a multi-GB CUDA
# build onto a machine without a GPU. Override TORCH (and TORCH_INDEX, e.g.
# https://download.pytorch.org/whl/cpu elsewhere) to pick another build:
#   make test TORCH='torch==2.13.0' TORCH_INDEX=https://download.pytorch.org/whl/cu128
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH ?= torch>=2.4,<3
else
TORCH ?= torch==2.13.0
endif
TORCH_INDEX ?=
PIP_TORCH_FLAGS := $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX),)
EXTRAS ?= dev
STAMP  := $(VENV)/.ciea-installed
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: demo test test-slow test-all lint bench lock clean venv

venv: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install --quiet $(PIP_TORCH_FLAGS) "$(TORCH)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ciea demo $(DEMO_ARGS)

# The loop: every tier but the tests marked `slow` (the paper-size rehearsal, the scale bench).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The slow tier alone (CI runs it after `make test`; ≈ 15 GB peak for the paper rehearsal).
# The two-node cluster test runs in a pytest of its own: it starts and stops Ray clusters of its
# own, which the rest of the tier's shared local Ray must not outlive or meet.
CLUSTER_TEST := tests/integration/test_cluster_two_nodes.py
test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow --ignore=$(CLUSTER_TEST) $(PYTEST_ARGS)
	$(BIN)/python -m pytest -m slow $(CLUSTER_TEST) $(PYTEST_ARGS)

test-all: test test-slow

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m bench.model_forward --threads 1 --clock cpu

# Re-pin constraints.txt to what the venv resolved (torch is pinned by TORCH above, and
# left out so that GPU and CPU builds both satisfy it).
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v -i -E '^(torch|ciea)==' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
