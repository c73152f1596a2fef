# protoclr: `make train` and `make test` do all set-up on a fresh machine (see README).
PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
PIP        := $(VENV)/bin/pip
MAX_JOBS   ?= 2
CSRC       := $(shell find csrc -type f 2>/dev/null)

.PHONY: install train test test-slow test-gpu bench quality lint clean

# Dependencies: only when requirements.txt changes.
$(VENV)/.stamp-deps: requirements.txt
	test -x $(PY) || $(PYTHON_SYS) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements.txt
	touch $@

# The extension: only when a C++/CUDA source or setup.py changes (ninja rebuilds changed objects only).
$(VENV)/.stamp-build: $(VENV)/.stamp-deps setup.py $(CSRC)
	MAX_JOBS=$(MAX_JOBS) $(PIP) install -q -e . --no-build-isolation --no-deps
	touch $@

install: $(VENV)/.stamp-build

train: install
	$(PY) train.py $(ARGS)

test: install
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

test-slow: install
	$(PY) -m pytest -m "slow and not gpu" $(PYTEST_ARGS)

test-gpu: install
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

bench: install
	$(PY) bench/kernels.py --device cpu

# The representation-quality study (bench/quality.py): Fashion-MNIST, SPCL vs SimCLR vs supervised vs pixels.
quality: install
	$(PY) bench/quality.py $(ARGS)

lint: install
	$(VENV)/bin/ruff format --check . && $(VENV)/bin/ruff check .

clean:
	rm -rf build *.egg-info protoclr/_C*.so $(VENV)/.stamp-build
