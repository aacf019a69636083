# Two commands on a fresh clone: `make demo` (set up, then train the offline demo) and `make test` (set up, then
# run the checks CI runs). Both create the virtual environment on first use and reuse it after.
#
# torch first, pinned: an unpinned torch (or one pulled in by another package) can resolve to a multi-GB CUDA
# build. On a CPU-only machine point pip at torch's CPU wheels, e.g.
#   make demo TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu"

VENV ?= .venv
PYTHON ?= python3
TORCH ?= torch==2.13.0
TORCH_PIP_ARGS ?=
BIN := $(VENV)/bin

.PHONY: setup demo test clean

$(BIN)/lora-dpo: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH) $(TORCH_PIP_ARGS)
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

setup: $(BIN)/lora-dpo

# `lora-dpo` lives in the venv: a new shell finds it only once the venv is activated (README, "What next")
demo: setup
	$(BIN)/lora-dpo train recipes/tiny.toml --overwrite
	@echo
	@echo "Next (README, What next): put lora-dpo on your PATH by activating the venv in your shell, then try"
	@echo "  . $(VENV)/bin/activate"
	@echo "  lora-dpo inspect adapters/tiny"
	@echo "  lora-dpo eval adapters/tiny --prompts recipes/tiny_prompts.txt --scorer shapes --steps 20"

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

clean:
	rm -rf $(VENV)
