# Two commands on a fresh machine: `make quickstart` and `make test`.
# Both create .venv and install what they need into it.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0
# Where torch comes from. Empty: pip's configured indexes (on PyPI, torch for Linux x86-64 is the CUDA build).
# For a CPU-only install: make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
TAMING_WHEEL := taming-transformers-rom1504==0.0.6
# Inception-v3 FID features (--fid-features on its weights file); its PyPI metadata asks for torchvision.
TORCH_FIDELITY_WHEEL := torch-fidelity==0.3.0

.PHONY: install test test-all quickstart demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first, pinned (from TORCH_INDEX_URL when set), so that nothing below re-resolves it or pulls torchvision.
	$(PIP) install -q torch==$(TORCH_VERSION) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL))
	echo "torch==$(TORCH_VERSION)" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test,demo]"
	# The reference for the VQGAN parity tests; its PyPI metadata asks for an unpinned torch and torchvision.
	$(PIP) install -q --no-deps $(TAMING_WHEEL)
	# torch-fidelity's Inception-v3 module for FID features; medmax imports it without the package __init__ (torchvision).
	$(PIP) install -q --no-deps $(TORCH_FIDELITY_WHEEL)
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

test-all: $(STAMP)
	$(PY) -m pytest -q -m "" tests

quickstart: $(STAMP)
	$(PY) -m quickstart --output runs/quickstart

# The browser demo on the quickstart's model (made first when missing); http://127.0.0.1:7860
demo: $(STAMP)
	test -f runs/quickstart/model/config.json || $(MAKE) quickstart
	$(PY) -m medmax demo --model runs/quickstart/model

# Every benchmark at full size, then BENCHMARKS.md from the records (BENCH_FLAGS=--quick for the small sizes).
bench: $(STAMP)
	PYTHON=$(PY) bench/run_all.sh $(BENCH_FLAGS)

clean:
	rm -rf $(VENV) runs
