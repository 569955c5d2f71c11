# A newcomer needs two commands: `make run` (set up, then start the bot) and `make test` (set up,
# then run the suite). Both are idempotent: the virtualenv is rebuilt only when the dependency
# files change. Versions come from constraints.txt, so every machine installs the same set.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt

.PHONY: setup setup-test run test lock clean

setup: $(VENV)/.installed-run
setup-test: $(VENV)/.installed-test

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed-run: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -e '.[test]'
	touch $@ $(VENV)/.installed-run

run: setup
	$(BIN)/atelier run

test: setup-test
	$(BIN)/python -m pytest

# Refresh constraints.txt after changing dependencies in pyproject.toml.
lock: setup-test
	{ sed -n '1,2p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable; } > constraints.new
	mv constraints.new constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
