# `make demo`: install the project, then run the whole demo pipeline on the toy world (`make pipeline`).
# `make test`: install it with the dev extras (pytest, the plots, dashboard and cluster extras, a PostgreSQL
# wheel) and, as root with apt-get, SLURM from the distribution's packages (`make slurm`), then run the suite.
# `make ui`: MLflow on 127.0.0.1:5000, printing the runs table's address. `make plots`: DVC's plots, offline.
# `make mutants`: mutation testing of a sample of the core's mutants with mutmut, then its report (docs/testing.md;
# not part of `make test`); `make mutants MUTANTS=all`: every mutant (hours); MUTANTS='recall.metrics.*': those.
VENV ?= .venv
PYTHON ?= python3
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DVC_NO_ANALYTICS := 1

.PHONY: install demo pipeline test slurm bench ui plots mutants clean

# installs go through uv (from the package registry, like everything else): parallel downloads and a shared cache
# make them several times faster than pip's; UV_NATIVE_TLS: the system's certificates, as pip uses.
# --compile-bytecode: every module compiled once at install, as pip does (uv does not by default, and where
# PYTHONDONTWRITEBYTECODE is set every stage's process would compile torch, MLflow, ... again: 3x the start time)
export UV_NATIVE_TLS := 1
UV = $(VENV)/bin/uv pip install -q --compile-bytecode --python $(VENV)/bin/python

$(VENV)/bin/uv:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q "uv>=0.13,<0.14"

# what the demo needs
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/uv
	$(UV) -e .
	touch $@

# what the tests and benchmarks need too (one install from a fresh clone)
$(VENV)/.installed-dev: pyproject.toml | $(VENV)/bin/uv
	$(UV) -e ".[dev]"
	touch $(VENV)/.installed $@

install: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(MAKE) --no-print-directory pipeline
	dvc metrics show
	@echo "Results: reports/summary.md, reports/curves.png; browse runs with: make ui; DVC's plots offline: make plots"

# the pipeline two stages at a time, each run on one thread (recall/stage_jobs.py: a stage starts once the stages it
# reads have finished; two one-thread runs finish sooner than one two-thread run after the other; the pretraining
# keeps its two threads and runs alone; it exits 0 only when every stale stage ran and is committed); if a stage
# failed, `dvc repro`, which runs it again with its error in the terminal
pipeline:
	python -m recall.stage_jobs dvc.yaml --jobs 2 --alone pretrain || dvc repro

# two pytest-xdist workers, one per core; a test file stays on one worker (its module fixtures are built once),
# the slowest files first (their order: tests/conftest.py)
test: $(VENV)/.installed-dev slurm
	pytest -q -n 2 --dist loadfile --no-loadscope-reorder; status=$$?; if [ $$status -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$status

# the one-node SLURM of tests/test_stage_jobs_slurm.py (tests/slurm_cluster.py starts it): Debian's packages, installed
# quietly when running as root with apt-get (about 11 s here, the package lists updated first); elsewhere those tests
# skip, saying why
slurm:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && [ ! -x /usr/sbin/slurmctld ]; then \
	  echo "installing slurmctld, slurmd, munge (the SLURM tests)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd munge \
	    slurm-client) >/dev/null 2>&1 || echo "could not install SLURM: its tests will skip" >&2; \
	fi

bench: $(VENV)/.installed-dev
	python benchmarks/train_throughput.py
	python benchmarks/label_eval.py
	python benchmarks/startup.py
	python benchmarks/metrics.py
	python benchmarks/transforms.py
	python benchmarks/replay.py
	python benchmarks/gpu_throughput.py

ui: $(VENV)/.installed
	python -m recall.ui --uri sqlite:///mlflow.db --port 5000

plots: $(VENV)/.installed-dev
	python -m recall.plots --out dvc_plots/offline

# the configuration is [tool.mutmut] in pyproject.toml; results stay in mutants/ (`mutmut results`, `mutmut show NAME`)
MUTANTS ?=
mutants: $(VENV)/.installed-dev
	set -f; p="$$(python benchmarks/mutation_report.py --scope $(MUTANTS))" && [ -n "$$p" ] && mutmut run --max-children 2 $$p
	python benchmarks/mutation_report.py --out docs/mutation.json

clean:
	rm -rf runs models reports data/toy mlflow.db mlruns dvc_plots mutants
