# accord — every target installs what it needs into .venv on first use.
PY     ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# CPU runs keep freed memory in the process instead of handing it back to the OS and faulting it in again on the
# next step (glibc's allocator; others ignore these): `accord run --profile quick` 6–9% faster, peak memory +3%.
export MALLOC_MMAP_THRESHOLD_ ?= 2000000000
export MALLOC_TRIM_THRESHOLD_ ?= 2000000000

.PHONY: install bytecode demo test test-bf16 test-all lint bench clean

install: $(STAMP)

# torch first (the CPU build when none is importable); never pinned in pyproject.
# The rest through uv when it installs (≈10 s instead of ≈80 s with pip), else pip. Both leave compiled bytecode
# (.pyc) beside what they install (uv only when asked): where PYTHONDONTWRITEBYTECODE is set, as on the development
# machine, Python otherwise compiles transformers & co. from source in every process it starts — 6 of the 15 s a
# one-process training launch took there, and half of `accord --help`'s 3 s.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install torch==2.13.0 || $(BIN)/python -m pip install torch
	($(BIN)/python -m pip install -q uv && $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e ".[dev,qr]") \
	  || $(BIN)/python -m pip install -q -e ".[dev,qr]"
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/accord demo

# accord's own bytecode first (only what changed since the last time), for the many Python processes the suite starts
bytecode: $(STAMP)
	@$(BIN)/python -m compileall -q src

test: bytecode
	$(BIN)/python -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-bf16: bytecode  # the CPU suite with a GPU's defaults on the CPU: bf16 autocast and weights, chunked head, lean layers, fused AdamW
	ACCORD_TESTS_BF16=1 $(BIN)/python -m pytest -m "not slow and not gpu" -q $(PYTEST_ARGS)

test-all: bytecode
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests bench

bench: $(STAMP)
	@$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/python -m pip install -q -e ".[bench]"
	@for f in bench/*.py; do [ $$f = bench/goals.py ] && continue; echo "== $$f"; $(BIN)/python $$f || exit 1; done  # goals.py reads a GPU run's output

clean:
	rm -rf $(VENV) runs .pytest_cache
