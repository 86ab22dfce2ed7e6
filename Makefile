# Two set-up commands on a fresh machine: `make demo` and `make test`.
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
STAMP   := $(VENV)/.quantpatch-installed
TESTS   := $(VENV)/.quantpatch-test-installed
OUT     ?= runs/demo

.PHONY: demo test lint bench clean

$(PYTHON):
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PYTHON)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e .
	touch $(STAMP)

# the test extras (pytest, hypothesis, ruff, timm, ray, playwright) only where tests run; torchattacks
# without its stale requests pin (see the attacks extra in pyproject.toml)
$(TESTS): $(STAMP)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[test]"
	$(PYTHON) -m pip install --quiet --disable-pip-version-check --no-deps "torchattacks>=3.5,<4"
	touch $(TESTS)

demo: $(STAMP)
	$(VENV)/bin/quantpatch run studies/demo.yaml --out $(OUT)
	@echo "Report: $(OUT)/report.html"

test: $(TESTS)
	$(PYTHON) -m pytest

lint: $(TESTS)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(VENV)/bin/ruff format --check src tests benchmarks examples

bench: $(STAMP)
	$(PYTHON) -m pip install --quiet --disable-pip-version-check -e ".[bench]"
	$(PYTHON) benchmarks/patch_speed.py
	$(PYTHON) benchmarks/fake_quant_cost.py
	$(PYTHON) benchmarks/fake_quant_kernel.py
	$(PYTHON) benchmarks/patch_pgd_speed.py
	$(PYTHON) benchmarks/spatial_throughput.py
	$(PYTHON) benchmarks/cli_startup.py

clean:
	rm -rf runs .pytest_cache
