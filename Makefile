# Two commands: `make study` runs the default study, `make test` runs the test suite. Both create .venv if missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= default
RUN_ID ?= $(PRESET)-$(shell date -u +%Y%m%d-%H%M%S)
SET ?=
SEEDS ?=

.PHONY: study test smoke kernel clean-venv

# The stamp files make an install happen once, and again whenever pyproject.toml changes.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: pip takes the local CPU wheel instead of resolving a CUDA build
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $@

# The default preset with no SET or SEEDS is the registered study (docs/preregistration.md: its seeds, refused from a
# checkout that is not one clean commit); any other choice is a study of its own.
REGISTERED = $(if $(filter default,$(PRESET)),$(if $(strip $(SET)$(SEEDS)),,--registered))
study: $(VENV)/.installed
	$(VENV)/bin/synthflaw run --preset $(PRESET) --run-id $(RUN_ID) $(REGISTERED) $(foreach s,$(SET),--set $(s)) $(if $(SEEDS),--seeds $(SEEDS))

smoke: $(VENV)/.installed
	$(VENV)/bin/synthflaw run --preset smoke --run-id smoke-$(shell date -u +%Y%m%d-%H%M%S)

# The import contracts in pyproject.toml (layers, no cycles) first, then the tests on one worker per core
# (pytest-xdist, a test file at a time: its module fixtures are made once; tests/conftest.py's scheduler keeps the files
# that read the shared smoke studies on one worker), with the 15 slowest listed.
PYTEST_WORKERS ?= auto
test: $(VENV)/.installed-dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q --durations=15 -n $(PYTEST_WORKERS) --dist loadfile

# `make test-fast`: the test suite without the end-to-end tests marked slow (study, paper preset, reference, DDP launch).
.PHONY: test-fast
test-fast: $(VENV)/.installed-dev
	$(VENV)/bin/lint-imports
	$(PY) -m pytest -q -m "not slow" -n $(PYTEST_WORKERS) --dist loadfile

# `make mutation`: the on-demand mutation check, not part of `make test` (docs/testing.md: "The mutation check"). mutmut puts
# small bugs, one at a time, into the functions that carry the study's rules (pyproject.toml's [tool.mutmut] names the
# files and the fast tests that run), runs the tests that reach each one, then lists the mutants no test failed.
# 40-60 minutes on 2 busy cores; MUTANTS= narrows it, e.g. make mutation MUTANTS='synthflaw.metrics.statistics.*'
MUTANTS ?= synthflaw.metrics.statistics.* synthflaw.reporting.findings.* synthflaw.reporting.findings_report.* synthflaw.reporting.verdicts.* \
	synthflaw.metrics.likelihood.* \
	synthflaw.training.sft.xǁPackedChatCollatorǁ* synthflaw.runs.staleness.x_upstream_causes* \
	synthflaw.runs.staleness.xǁFreshnessǁ* synthflaw.runs.markers.x_describe_changes*
MUTATION_CHILDREN ?= 2
.PHONY: mutation
mutation: $(VENV)/.installed-dev
	HF_HUB_OFFLINE=1 $(VENV)/bin/mutmut run --max-children $(MUTATION_CHILDREN) $(foreach m,$(MUTANTS),'$(m)')
	$(VENV)/bin/mutmut results | grep -v ": not checked" || true

# A Jupyter kernel named "synthflaw" that runs in .venv, for stepping through the notebooks in JupyterLab.
kernel: $(VENV)/.installed
	$(PY) -m ipykernel install --user --name synthflaw --display-name "Python (synthflaw)"

clean-venv:
	rm -rf $(VENV)
