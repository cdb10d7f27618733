# Fresh machine: `make demo` and `make test`. Both install into .venv/ first (a no-op when up to date).
PY := .venv/bin/python
STAMP := .venv/.installed
export PREFIX_CACHE_DIR ?= $(CURDIR)/.cache/prefix

.PHONY: install demo test unit bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip uninstall -qq -y prefix  # the distribution's name before it became prefix-train (older venvs)
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m pip uninstall -qq -y torchvision  # see constraints.txt: unused, and PyPI's wheel breaks transformers here
	touch $(STAMP)

# Two ranks on CPU for a few minutes, then a sample of generated Python from the trained model.
demo: install
	.venv/bin/torchrun --nproc-per-node 2 -m prefix.train --config configs/demo.yaml --run-name demo

# Everything CI runs: tests/unit (in-process) and tests/integration (real torchrun, signals, servers).
test: install
	$(PY) -m pytest -q --durations=20 tests

# The fast subset for your own iterations: in-process, no training processes (seconds).
unit: install
	$(PY) -m pytest -q tests/unit

# Every benchmark in bench/, ratios measured side by side (8-15 minutes on 2 cores); writes docs/benchmarks.md.
bench: install
	$(PY) bench/run_all.py

lint: install
	.venv/bin/ruff check .

clean:
	rm -rf .venv .cache runs
