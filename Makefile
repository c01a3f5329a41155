# dlwatchd: every target bootstraps .venv on a fresh machine; `install` is quick once it is there.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test lint bench clean demo schemas

install: $(STAMP)

# Reinstall only when the project's metadata changed (the package itself is installed editable).
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@touch $(STAMP)

run: install
	$(BIN)/dlwatchd run

# Two pytest workers: most end-to-end tests wait on daemons, so two cores run the suite in less time.
TEST_WORKERS ?= 2
test: install
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

lint: install
	$(BIN)/ruff check dlwatchd tests benchmarks
	$(BIN)/ruff format --check dlwatchd tests benchmarks
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/pickup_latency.py
	$(BIN)/python benchmarks/supervisor_footprint.py
	$(BIN)/python benchmarks/infer_throughput.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/spool_load.py

demo: install
	$(BIN)/dlwatchd demo

# docs/schemas/: one JSON Schema per name `dlwatchd schema NAME` accepts, plus requests.json for every request.
SCHEMA_NAMES = $(BIN)/python -c "from dlwatchd.protocol.requests import REQUEST_MODELS; print(*REQUEST_MODELS, 'status', 'heartbeat')"

schemas: install
	@mkdir -p docs/schemas
	rm -f docs/schemas/*.json
	$(BIN)/dlwatchd schema > docs/schemas/requests.json
	for n in $$($(SCHEMA_NAMES)); do $(BIN)/dlwatchd schema $$n > docs/schemas/$$n.json || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
