# Two commands do all the setup on a fresh clone: `make demo` and `make test`.
# Both create .venv and install relreg (with the pinned, tested dependency set) when missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.relreg-installed
OUT ?= runs/demo

.PHONY: venv test test-all demo bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(VENV)/bin/relreg demo --out $(OUT)

bench: $(STAMP)
	$(PY) experiments/bench_explain.py --out experiments/results/bench_explain.json
	$(PY) experiments/bench_train.py --out experiments/results/bench_train.json

lint: $(STAMP)
	$(VENV)/bin/ruff check relreg tests experiments

clean:
	rm -rf $(VENV) runs .pytest_cache
