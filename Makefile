# Two commands matter: `make demo` and `make test`. Both install the system packages they
# need (scripts/system-deps.sh: apt-get as root or via sudo -n, else one line saying how),
# create .venv when missing and re-install only when pyproject.toml changes, so a re-run
# starts in seconds.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
GPFM_DATA_DIR ?= $(abspath ../shared/data)
export GPFM_DATA_DIR
# numba (UMAP) compiles once and caches across sessions here.
export NUMBA_CACHE_DIR ?= $(abspath .cache/numba)

SYSDEPS := bash scripts/system-deps.sh

.PHONY: setup demo test lint bench clean manifest sysdeps-test sysdeps-demo
# prerequisites run in order: system packages before the venv that needs them
.NOTPARALLEL:

$(STAMP): pyproject.toml
	@test -x $(PY) || { PYTHON=$(PYTHON) $(SYSDEPS) venv && $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

setup: $(STAMP)

sysdeps-test sysdeps-demo:
	@$(SYSDEPS) $(@:sysdeps-%=%)

# Opens napari with the sample slide, embedded by the default encoder, with every
# overlay the plugin has. Without a display it renders the same state under Xvfb
# into demo_out/demo.png and exits.
demo: sysdeps-demo setup
	@mkdir -p demo_out
	@if [ -n "$$DISPLAY" ] || [ -n "$$WAYLAND_DISPLAY" ] || [ "$$(uname -s)" = Darwin ]; then \
		$(VENV)/bin/napari-gpfm demo --out demo_out; \
	else \
		echo "no display: rendering the demo headless to demo_out/demo.png"; \
		xvfb-run -a -s "-screen 0 1600x1000x24" $(VENV)/bin/napari-gpfm demo --out demo_out --screenshot demo_out/demo.png; \
	fi

# Tests never download anything. napari runs under Xvfb (pytest-xvfb), display or not.
test: export HF_HUB_OFFLINE := 1
test: sysdeps-test setup
	$(VENV)/bin/ruff check src tests benchmarks scripts
	$(PY) -m npe2 validate napari-gpfm
	$(PY) scripts/sync_napari_manifest.py --check
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks scripts

# napari.yaml's reader filename patterns from gpfm_core's one list of suffixes
manifest: setup
	$(PY) scripts/sync_napari_manifest.py

# Every benchmark at its default size (the 100k x 100k slide and the 1M-tile cohorts are
# generated once into bench_out/; the whole run takes hours on 2 cores). LazySlide's
# comparison runs when .venv-lazyslide exists (see bench_cpu_path.py). Figures and machine
# details go to BENCHMARKS.md.
bench: sysdeps-test setup
	$(PY) benchmarks/bench_slides.py
	$(PY) benchmarks/bench_tissue.py
	xvfb-run -a $(PY) benchmarks/bench_napari_open.py
	$(PY) benchmarks/bench_embed.py
	$(PY) benchmarks/bench_cpu_path.py
	$(PY) benchmarks/bench_analysis.py
	xvfb-run -a $(PY) benchmarks/bench_dock.py
	$(PY) benchmarks/bench_cohort.py
	$(PY) benchmarks/bench_index.py
	xvfb-run -a $(PY) benchmarks/bench_cohort_dock.py
	$(PY) benchmarks/bench_eval.py
	xvfb-run -a $(PY) benchmarks/bench_slide_model.py --viewer
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_train_data.py

clean:
	rm -rf $(VENV) .cache demo_out bench_out
