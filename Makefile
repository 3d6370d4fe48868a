# Every target sets itself up: a fresh clone needs nothing but python3.
PYTHON ?= python3
VENV   := .venv
PY     := $(abspath $(VENV))/bin/python
STAMP  := $(VENV)/.installed

.PHONY: all venv test test-host test-lab demo bench clean

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,lab]'
	touch $(STAMP)

venv: $(STAMP)

# Host tests, then the soft-dirty tests inside the lab VM (one boot).
test: $(STAMP)
	$(PY) -m pytest -q -m 'not lab' tests
	$(PY) tests/lab/run.py

test-host: $(STAMP)
	$(PY) -m pytest -q -m 'not lab' tests

test-lab: $(STAMP)
	$(PY) tests/lab/run.py

demo: $(STAMP)
	$(PY) demo/run.py

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
