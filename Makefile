# Two commands for a fresh machine with nothing but Python 3.11:  make demo  /  make test
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
PIP     = $(PY) -m pip

.PHONY: install demo test test-fast lint mutants clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m flows.build --preset demo

# Two worker processes, a test file each at a time: the end-to-end tests spend much of their time waiting on
# servers, workers and subprocesses, which the other worker's tests use. Files in collection order, the longest first
# (tests/conftest.py LONGEST_FILES), not xdist's default order by number of tests.
test: install
	$(PY) -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder

test-fast: install
	$(PY) -m pytest tests -n 2 --dist loadfile --no-loadscope-reorder -m "not slow"

# Named deliberate bugs in the mechanism and contract modules, each run against its targeted tests in a temporary
# copy of the tree (slow: about 30 minutes on 2 cores; not part of `make test`). Result: benchmarks/results/mutants.md
mutants: install
	$(PY) benchmarks/mutants.py

lint: install
	$(VENV)/bin/ruff check realfake flows tasks tests benchmarks

clean:
	rm -rf $(VENV) out
