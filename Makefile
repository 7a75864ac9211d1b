# Two commands for a fresh clone:  make app  |  make test
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
FLICKR8K ?= ../shared/data/flickr8k

.PHONY: app test install system-deps train-flickr8k ensemble-flickr8k evaluate-flickr8k bench

# The venv is (re)built when pyproject.toml changes. torch comes from pip's index as usual.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Java runs METEOR and the PTB tokenizer (pycocoevalcap); chromium drives the browser test.
system-deps:
	@command -v java >/dev/null 2>&1 || { echo "installing a headless JRE for METEOR"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq default-jre-headless >/dev/null; }
	@command -v chromium >/dev/null 2>&1 || { echo "installing chromium for the browser test"; \
	  (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || \
	  echo "chromium could not be installed: the browser test will be skipped"; }

app: $(STAMP)
	$(PY) app.py

# CAPTIONER_REQUIRE_JAVA: the tests that need Java run (and fail without it) instead of skipping.
test: $(STAMP) system-deps
	CAPTIONER_REQUIRE_JAVA=1 $(PY) -m pytest -q

# Reproduces the shipped model (see checkpoints/README.md).
train-flickr8k: $(STAMP)
	FLICKR8K=$(FLICKR8K) PY=$(PY) bash data/train_flickr8k.sh

# Round two's ensemble experiment (the model card's "Round two"); writes runs/ensemble-flickr8k/ensemble.safetensors.
ensemble-flickr8k: $(STAMP)
	FLICKR8K=$(FLICKR8K) PY=$(PY) bash data/ensemble_flickr8k.sh

evaluate-flickr8k: $(STAMP)
	$(PY) -m captioner evaluate --dataset flickr8k --data-root $(FLICKR8K) --split test --method beam --beam-size 3

# Speed measurements quoted in the README (need ../shared/data/flickr8k).
bench: $(STAMP)
	$(PY) benchmarks/bench_caption.py --repeats 3 --subprocess
	$(PY) benchmarks/bench_webapp.py
