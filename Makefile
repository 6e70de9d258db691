# evomerge: `make demo` runs the built-in demo, `make test` runs the test suite.
# Both create .venv and install the project the first time (and again when its
# dependencies change). torch is pinned by constraints.txt so pip never swaps in a
# CUDA build on a CPU machine: edit it for your accelerator.

PYTHON ?= python3
VENV   := .venv
# pytest-xdist processes: most of the suite's time is end-to-end searches waiting on
# processes, Ray and deadlines, so two share two cores well (tests/conftest.py keeps the
# PostgreSQL-stopping tests on one of them).
TEST_WORKERS ?= 2
STAMP  := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: demo test bench bench-merge bench-search install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test,postgres,tracking]'
	touch $@

demo: $(STAMP)
	$(VENV)/bin/evomerge demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup --durations=10

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/candidate_time.py

bench-merge: $(STAMP)  # ~15 min: 3 x 110 M-parameter models, every operator, vs memcpy and mergekit
	$(VENV)/bin/python benchmarks/merge_throughput.py --size 100m

bench-search: $(STAMP)  # ~40-55 min: 4 landscapes x 2 optimizers x 5 seeds of 120-evaluation searches
	$(VENV)/bin/python benchmarks/search_quality.py $(BENCH_SEARCH_ARGS)

clean:
	rm -rf $(VENV) evomerge-demo
