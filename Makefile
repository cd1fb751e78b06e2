# medpipe: the two commands.
#   make run   install into .venv (first time), validate params.yaml, then run the whole pipeline on the built-in
#              synthetic cohort (ARGS="-S train.epochs=2" runs overrides as a DVC experiment instead)
#   make test  install into .venv (first time), then run the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
# the stages in dvc.yaml call `python -m tasks.<stage>`: make that the venv's python
export PATH := $(abspath $(VENV))/bin:$(PATH)
# offline machines: no telemetry attempts from Prefect, DVC or MLflow
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export DO_NOT_TRACK ?= 1
export DVC_NO_ANALYTICS ?= 1

.PHONY: install run test test-fast lint ui prefect-ui deploy worker

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --progress-bar on -e '.[dev]'
	touch $@

# the page `dvc plots show` renders into (.dvc/config), with Vega inlined from the installed package: offline plots
.dvc/plots.html: $(VENV)/.installed tasks/reporting/plots_page.py
	$(PY) -m tasks.reporting.plots_page --output $@

install: $(VENV)/.installed .dvc/plots.html

run: install
	$(PY) -m tasks.config --quiet params.yaml
	$(PY) -m flows.pipeline $(ARGS)

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

lint: install
	$(VENV)/bin/ruff check tasks flows tests benchmarks

ui: install
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///mlflow/mlflow.db --port 5000

prefect-ui: install
	$(VENV)/bin/prefect server start --host 127.0.0.1 --port 4200

# the work-pool deployment of prefect.yaml, against the server `make prefect-ui` starts (or PREFECT_API_URL's)
POOL ?= medpipe-process
deploy worker: export PREFECT_API_URL ?= http://127.0.0.1:4200/api
deploy: install
	$(VENV)/bin/prefect work-pool inspect $(POOL) >/dev/null 2>&1 || $(VENV)/bin/prefect work-pool create $(POOL) --type process
	$(VENV)/bin/prefect --no-prompt deploy --all

worker: install
	$(VENV)/bin/prefect worker start --pool $(POOL)
