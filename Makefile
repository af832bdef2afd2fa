# `make demo`: set everything up and run the demo. `make test`: the test suite on all four
# backends, one pytest process each. `make bench`: the benchmark suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
BACKENDS ?= numpy tensorflow jax torch
BENCH_ARGS ?=
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

test: install
	@failed=""; for b in $(BACKENDS); do \
	  echo "=== KERAS_BACKEND=$$b"; \
	  KERAS_BACKEND=$$b $(VENV)/bin/pytest tests || failed="$$failed $$b"; \
	done; \
	if [ -n "$$failed" ]; then echo "FAILED backends:$$failed"; exit 1; fi; \
	echo "all backends passed: $(BACKENDS)"

bench: install
	$(PY) -m benchmarks.run $(BENCH_ARGS)

clean:
	rm -rf build $(VENV) fastconv/*.so fastconv/_kernels_*.c *.egg-info
