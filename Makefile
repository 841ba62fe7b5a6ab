# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates .venv if missing, installs torch 2.13.0 (CPU) first, then prunekit with its extras.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.prunekit-installed

.PHONY: demo test lint bench mutation mutation-report mutation-head clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev,hf,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks examples
	$(PY) -m ruff format --check src tests benchmarks examples

test: lint
	$(PY) -m pytest -q

# The benchmarks behind the figures in README.md and docs/ (slow; not CI), written with the CPU
# they ran on to benchmarks/results/latest.md. BENCH=quick: the quick ones only (about a minute);
# BENCH="name ...": those (tools/run_benchmarks.py --help lists them).
BENCH ?= all
BENCH_STAMP := $(VENV)/.prunekit-bench-installed
$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install --quiet -e ".[dev,hf,demo,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) tools/run_benchmarks.py --only $(BENCH)

# Mutation testing (not CI): mutmut changes the code of the modules in [tool.mutmut] of
# pyproject.toml one mutant at a time and runs their fast tests; then the kill rate per module.
# MUTANTS: which mutants (mutmut name globs); MUTATION_JOBS: parallel test processes. One torch
# thread each: mutmut forks its test processes, and a fork of a process whose OpenMP pool is up
# can hang (a failing mutant then shows as a timeout).
MUTANTS ?= prunekit.patterns* prunekit.scope*
MUTATION_JOBS ?= 2
mutation: $(STAMP)
	$(PY) -c "import mutmut" 2>/dev/null || $(PY) -m pip install --quiet "mutmut>=3.8,<4"
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) $(foreach m,$(MUTANTS),'$(m)'); \
	status=$$?; $(PY) tools/mutation_report.py --survivors; exit $$status

mutation-report:
	$(PY) tools/mutation_report.py --survivors

# The same on the committed code (git HEAD, its src and tests) in a clean copy, for a working
# tree that holds other people's half-finished edits; results stay in $(MUTATION_HEAD_DIR).
MUTATION_HEAD_DIR ?= build/mutation-head
mutation-head: $(STAMP)
	rm -rf $(MUTATION_HEAD_DIR) && mkdir -p $(MUTATION_HEAD_DIR)
	git archive HEAD | tar -x -C $(MUTATION_HEAD_DIR)
	cd $(MUTATION_HEAD_DIR) && OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(abspath $(VENV))/bin/mutmut run --max-children $(MUTATION_JOBS) $(foreach m,$(MUTANTS),'$(m)'); \
	status=$$?; $(abspath $(PY)) tools/mutation_report.py --survivors; exit $$status

# On a machine with a CUDA GPU and its own torch (not this CPU .venv): the verbs on the GPU
# against the same calls on the CPU (tests/test_cuda.py, and the one-shot device test).
GPU_PYTHON ?= python3
gpu-check:
	cd tests && PYTHONPATH=../src $(GPU_PYTHON) -m pytest -q -rs -p no:cacheprovider test_cuda.py test_oneshot.py -k cuda

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis mutants
