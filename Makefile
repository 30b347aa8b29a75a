# `make demo`: install, then run the whole demo pipeline on the toy world (dvc repro).
# `make test`: install, then run the test suite.
# `make ui`: MLflow on 127.0.0.1:5000, printing the runs table's address. `make plots`: DVC's plots, offline.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install demo test bench ui plots clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	dvc repro
	dvc metrics show
	@echo "Results: reports/summary.md, reports/curves.png; browse runs with: make ui; DVC's plots offline: make plots"

test: install
	pytest -q; status=$$?; if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

bench: install
	python benchmarks/train_throughput.py
	python benchmarks/metrics.py
	python benchmarks/transforms.py
	python benchmarks/replay.py
	python benchmarks/gpu_throughput.py

ui: install
	python -m recall.ui --uri sqlite:///mlflow.db --port 5000

plots: install
	python -m recall.plots --out dvc_plots/offline

clean:
	rm -rf runs models reports data/toy mlflow.db mlruns dvc_plots
