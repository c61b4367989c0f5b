# prefork-interp for Python — developer entry points.  GNU make.
#
#   make demo    build .venv and show a slow script made fast
#   make test    install the reference binaries if missing, build .venv, run the tests
#   make lint    ruff + mypy          make bench / make soak    (see README)
#   make man     regenerate man/man1/*.1 from docs/man/*.rst (docutils' rst2man; both committed)
#
# PYTHON: the newest Python >= 3.12 that actually runs (pyenv shims on PATH fail unless their
# version is active, so every candidate is run, not just looked up); else python3.  Newer is
# better: from 3.12 on, sys.monitoring gives the server a fast executor exit.

SHELL := /bin/bash
.DEFAULT_GOAL := help

ifeq ($(origin PYTHON),undefined)
PYTHON := $(shell \
	for p in python3.14 python3.13 python3.12 \
	         $$(ls -d $(HOME)/.pyenv/versions/3.1[2-9]*/bin/python3 2>/dev/null); do \
	    v=$$("$$p" -c 'import sys; assert sys.version_info >= (3, 12); print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null) \
	        && echo "$$v $$(command -v "$$p")"; \
	done | sort -rV | head -n1 | cut -d' ' -f2-)
ifeq ($(PYTHON),)
PYTHON := python3
endif
endif

VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
PYTEST  := $(VPY) -m pytest -p no:cacheprovider
SUDO    := $(shell [ "$$(id -u)" = 0 ] || ! command -v sudo >/dev/null || echo sudo)
REFERENCE := /usr/bin/prefork-interp /usr/share/perl5/Proc/Prefork/Interp.pm

.PHONY: help venv deps test demo bench soak lint man clean distclean

help:
	@echo "targets: venv deps test demo bench soak lint man clean distclean   (PYTHON=$(PYTHON))"

# ------------------------------------------------------------------ venv

$(VPY):
	$(PYTHON) -m venv $(VENV)

# pip runs again only when pyproject.toml changes (or the stamp is removed).  PIP_QUIET
# drops the warnings this machine's pip configuration prints for every missing local index.
PIP_QUIET := 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }

$(STAMP): pyproject.toml | $(VPY)
	set -o pipefail; $(VPY) -m pip install -q -e '.[test]' $(PIP_QUIET)
	@touch $@

venv: $(STAMP)
	@$(VPY) tools/make_launcher.py -q --venv $(VENV)

# ------------------------------------------------------------------ reference binaries

deps:
	@missing=; for f in $(REFERENCE); do [ -e "$$f" ] || missing=1; done; \
	if [ -n "$$missing" ]; then \
	    echo "installing the reference implementation (chiark-utils-bin, chiark-scripts)"; \
	    $(SUDO) apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chiark-utils-bin chiark-scripts; \
	fi

# ------------------------------------------------------------------ tests and tools

# Nothing is printed after pytest: its summary is the last line.
test: deps venv
	$(PYTEST) -q

soak: deps venv
	$(PYTEST) -q -m soak tests

demo: venv
	$(VPY) examples/demo.py

BENCH_STAMP := $(VENV)/.installed-bench
$(BENCH_STAMP): $(STAMP)
	set -o pipefail; $(VPY) -m pip install -q -e '.[test,bench]' $(PIP_QUIET)
	@touch $@

# pip writes its own (slow) console-script launchers: the fast ones are written again after it.
bench: deps venv
	@$(MAKE) --no-print-directory $(BENCH_STAMP)
	@$(VPY) tools/make_launcher.py -q --venv $(VENV)
	$(VPY) bench/bench.py

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

# Manual pages: one reStructuredText source per command, rendered by docutils (a test
# dependency, so in .venv); the generated pages are committed and installed by pyproject.toml.
# tests/test_docs.py fails when a page is older than its source.
MAN_SOURCES := $(wildcard docs/man/*.rst)
MAN_PAGES   := $(MAN_SOURCES:docs/man/%.rst=man/man1/%.1)

man: $(MAN_PAGES)

man/man1/%.1: docs/man/%.rst | $(STAMP)
	@mkdir -p $(@D)
	$(VENV)/bin/rst2man --strict $< $@.tmp
	@mv $@.tmp $@

clean:
	rm -rf build dist *.egg-info .mypy_cache .ruff_cache .hypothesis .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV)
