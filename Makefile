# Two commands matter: `make demo` and `make test`. Both create .venv when missing and
# re-install only when pyproject.toml changes, so a re-run starts in seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
GPFM_DATA_DIR ?= $(abspath ../shared/data)
export GPFM_DATA_DIR
# numba (UMAP) compiles once and caches across sessions here.
export NUMBA_CACHE_DIR ?= $(abspath .cache/numba)

.PHONY: setup demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

# Opens napari with the sample slide, embedded by the default encoder, with every
# overlay the plugin has. Without a display it renders the same state under Xvfb
# into demo_out/demo.png and exits.
demo: setup
	@mkdir -p demo_out
	@if [ -n "$$DISPLAY" ] || [ -n "$$WAYLAND_DISPLAY" ]; then \
		$(VENV)/bin/napari-gpfm demo --out demo_out; \
	else \
		echo "no display: rendering the demo headless to demo_out/demo.png"; \
		xvfb-run -a -s "-screen 0 1600x1000x24" $(VENV)/bin/napari-gpfm demo --out demo_out --screenshot demo_out/demo.png; \
	fi

test: setup
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m npe2 validate napari-gpfm
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

# Every benchmark at its default size (the 100k x 100k slide is generated once into
# bench_out/, about 9 minutes). Figures and machine details go to BENCHMARKS.md.
bench: setup
	$(PY) benchmarks/bench_slides.py
	xvfb-run -a $(PY) benchmarks/bench_napari_open.py
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_analysis.py
	xvfb-run -a $(PY) benchmarks/bench_dock.py
	$(PY) benchmarks/bench_train.py

clean:
	rm -rf $(VENV) .cache demo_out bench_out
