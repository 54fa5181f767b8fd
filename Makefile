# Two commands do all set-up on a fresh machine (Python 3.10+ with venv):
#   make train   -> venv + install + SRPO on the tiny preset (local, MLflow in ./mlflow.db)
#   make test    -> venv + install + the whole test suite
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install train test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

train: $(STAMP)
	$(BIN)/srpo train --config configs/tiny.yaml

# pytest exits 5 when it collects no test: that must fail, never pass silently.
test: $(STAMP)
	$(BIN)/python -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected" >&2; exit 1; fi; exit $$rc

bench: $(STAMP)
	$(BIN)/python benchmarks/step.py

clean:
	rm -rf $(VENV) .cache runs
