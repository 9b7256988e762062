# make install | make demo | make test — each creates or updates .venv as needed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt examples/llmos-driver-sim/pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev,bench,triton]"
	$(BIN)/python -m pip install -q -c constraints.txt -e examples/llmos-driver-sim
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/llmos demo

# Two workers: most tests wait on real kernels and processes, so two share the 2 cores
# well (about 5 min instead of 7 serially). `pytest -q tests` alone runs them serially.
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 tests

bench: $(STAMP)
	$(BIN)/python bench/engine_throughput.py

clean:
	rm -rf $(VENV)
