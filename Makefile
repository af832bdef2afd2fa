# `make demo`: set everything up and run the demo. `make test`: the test suite on all four
# backends, one pytest process each, two at a time. `make bench`: the benchmark suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS ?= numpy tensorflow jax torch
BENCH_ARGS ?=
TEST_LANES ?= 2
DEMO_ARGS ?=

.PHONY: install demo test bench clean

$(VENV)/.deps: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Always rebuilt: cheap when nothing changed, and a stale kernel build is worse than a slow one.
install: $(VENV)/.deps
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: install
	$(PY) -m fastconv.demo $(DEMO_ARGS)

# one `pytest tests` process per backend, in TEST_LANES concurrent lanes (tests/run_backends.py)
test: install
	$(PY) tests/run_backends.py --lanes $(TEST_LANES) $(BACKENDS)

bench: install
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) fastconv/*.so fastconv/_kernels_*.c *.egg-info
