# flowcore developer commands.  `make demo` and `make test` set up .venv first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Optional extras whose tests run in `make test` (all light; torch for
# flowcore.train comes from .ci/run, and its tests skip without it outside CI).
TEST_EXTRAS ?= test,graph,serve,data,rl,tune,dask,sklearn

.PHONY: venv demo demo-nodot test lint bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[$(TEST_EXTRAS)]" --config-settings editable_mode=compat
	# byte-compile the tree as an install does (an editable install under
	# PYTHONDONTWRITEBYTECODE never gets .pyc files: every process would
	# compile flowcore from source when it starts)
	$(PY) -m compileall -q flowcore
	touch $(STAMP)

demo: $(STAMP)
	$(PY) examples/demo.py

# `make demo` as on a fresh machine: no Graphviz `dot` (nor graphviz-pure) on PATH.
demo-nodot: $(STAMP)
	$(PY) tests/nodot.py $(PY) examples/demo.py

test: $(STAMP)
	$(PY) -m pytest -q

# Type-check the package (settings: [mypy] in setup.cfg).
lint: $(STAMP)
	$(PY) -m pip install -q "mypy>=1.10"
	$(PY) -m mypy flowcore

bench: $(STAMP)
	$(PY) -m pip install -q -e ".[bench,$(TEST_EXTRAS)]" --config-settings editable_mode=compat
	$(PY) -m benchmarks.run $(BENCH_ARGS)
	$(PY) -m benchmarks.serve_bench
	$(PY) -m benchmarks.dask_bench
	$(PY) -m benchmarks.data_bench
	$(PY) -m benchmarks.tune_bench
	$(PY) -m benchmarks.train_bench
	$(PY) -m benchmarks.resources_bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
