# Two commands for a fresh machine (see README):  make demo  |  make test
#
# torch: on Linux without an NVIDIA GPU, the plain `pip install torch==2.13.0` from PyPI pulls the CUDA build
# (more than 20 nvidia-* wheels). There the install adds PyTorch's CPU index as an extra index, so pip takes the
# CPU build (2.13.0+cpu sorts above 2.13.0), but only when that index answers (a 5 s probe): machines whose own
# registry serves a CPU build (CI) keep installing from it. Override with TORCH_INDEX=<url> or TORCH_INDEX=none,
# or replace the whole requirement with TORCH_INSTALL="...". `make torch-install-args` prints what is passed;
# `make check-install` resolves the whole install without installing and fails if a CUDA wheel is in it.
#
# Setup is idempotent: stamp files in $(VENV) record what is installed; a second `make demo` installs nothing.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
BIN := $(VENV)/bin
# pytest-xdist workers for `make test` (auto: one per core; 0 or 1: no xdist)
TEST_JOBS ?= auto

UNAME := $(shell uname -s)
HAS_NVIDIA := $(shell command -v nvidia-smi >/dev/null 2>&1 && echo yes)
# Evaluated only when an install runs (recursive `=`): a second `make demo` does not even probe.
ifeq ($(origin TORCH_INDEX),undefined)
  # CI's registry serves a CPU build: no probe of another host from CI
  ifeq ($(CI),true)
    TORCH_INDEX = none
  else ifeq ($(UNAME)$(HAS_NVIDIA),Linux)
    TORCH_INDEX = $(shell $(PYTHON) -c "import urllib.request as u; u.urlopen('$(TORCH_CPU_INDEX)/torch/', timeout=5)" >/dev/null 2>&1 && echo $(TORCH_CPU_INDEX) || echo none)
  else
    TORCH_INDEX = none
  endif
endif
TORCH_INDEX_ARGS = $(if $(filter none,$(TORCH_INDEX)),,--extra-index-url $(TORCH_INDEX))
TORCH_INSTALL ?= torch==$(TORCH_VERSION) $(TORCH_INDEX_ARGS)

STAMP_VENV := $(VENV)/.stamp-venv
STAMP_TORCH := $(VENV)/.stamp-torch-$(TORCH_VERSION)
STAMP_PKG := $(VENV)/.stamp-attnctl
STAMP_TEST := $(VENV)/.stamp-test

.PHONY: setup setup-test demo test test-browser torch-install-args check-install gallery-screenshot

$(STAMP_VENV):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	touch $@

$(STAMP_TORCH): $(STAMP_VENV)
	$(BIN)/python -m pip install -q $(TORCH_INSTALL)
	touch $@

$(STAMP_PKG): $(STAMP_TORCH) pyproject.toml
	$(BIN)/python -m pip install -q -e .
	touch $@

$(STAMP_TEST): $(STAMP_PKG)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(STAMP_PKG)

setup-test: $(STAMP_TEST)

demo: setup
	$(BIN)/python examples/quickstart.py --out out/quickstart

test: setup-test
	$(BIN)/python -m pytest -q $(if $(filter-out 0 1,$(TEST_JOBS)),-n $(TEST_JOBS))

# The gallery in a real headless browser (Chromium; skipped with the reason when it is not installed)
test-browser: setup-test
	$(BIN)/python -m pytest -q -rs tests/test_gallery_browser.py

torch-install-args:
	@echo $(TORCH_INSTALL)

# Resolve (not install) torch and attnctl as `make setup` would, into a report; fail if a CUDA wheel is in it.
check-install: $(STAMP_VENV)
	$(BIN)/python -m pip install --dry-run --ignore-installed --quiet --report $(VENV)/install-report.json \
		$(TORCH_INSTALL) -e .
	$(BIN)/python .ci/check_install.py $(VENV)/install-report.json

# docs/images/gallery.png: the gallery of examples/jobs/gallery.toml in headless Chromium
gallery-screenshot: setup
	$(BIN)/attnctl render examples/jobs/gallery.toml --out out/gallery --progress none
	chromium --headless --no-sandbox --disable-gpu --no-first-run --hide-scrollbars --window-size=1200,1500 \
		--user-data-dir=$$(mktemp -d) --screenshot=docs/images/gallery.png file://$(CURDIR)/out/gallery/index.html
