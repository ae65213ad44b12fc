# Two commands on a fresh machine (README): `make demo` and `make test`.
# Both run scripts/bootstrap.sh first (idempotent: venv + packages, promtool, Go-built binaries).

VENV        ?= .venv
PYTHON      := $(VENV)/bin/python
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help bootstrap test demo lint format pytest sync-crds

help:
	@echo "make demo       bootstrap, then the end-to-end demo on real pods (local cluster, chart, tiny CPU model)"
	@echo "make test       bootstrap, ruff, then the whole test suite (python -m pytest)"
	@echo "make lint       ruff check ., then mypy on the packages (operator, runtime, dev tooling)"
	@echo "make pytest     only the tests (PYTEST_ARGS='-x tests/chart' to narrow)"
	@echo "make sync-crds  copy crds/ into the Helm chart"

bootstrap:
	scripts/bootstrap.sh

test: bootstrap lint pytest

demo: bootstrap
	$(VENV)/bin/diffusion-dev demo

# mypy reads the packages from this checkout (pyproject: mypy_path), not from the editable install
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy operator/diffusion_operator runtime/diffusion_runtime dev/diffusion_dev

format:
	$(VENV)/bin/ruff format .

# pytest exits 5 when it collected no test: a failure here, like any other non-zero status.
pytest:
	@rc=0; $(PYTHON) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make pytest: no tests were collected (pytest exit 5): failing" >&2; fi; \
	exit $$rc

sync-crds:
	tools/sync_chart_crds.sh
