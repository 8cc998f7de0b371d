#!/usr/bin/env bash
# GPU acceptance check of the embedding engine: one H200 (16 CPU cores), under 8 minutes.
#
#   benchmarks/gpu_check.sh --prepare  HERE, with network: fetch the wheels the device image
#                                      lacks into .whl/ and copy the sample images into
#                                      bench_out/gpu_data/ (both git-ignored, both carried)
#   device run:  command "bash benchmarks/gpu_check.sh", carry [".whl", "bench_out/gpu_data"]
#   benchmarks/gpu_check.sh --tiny     CPU dry run of the same code (tiny-vit, small slide)
#
# The device image has python3 3.12 with torch, timm, h5py, tifffile, numpy, Pillow, tqdm
# (see /work/.library/device/KINDS.md) but no openslide or imagecodecs: those come from
# .whl/. It cannot see ../shared, so the slides are generated there from the carried
# sample images. Extra arguments go to benchmarks/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
DATA=bench_out/gpu_data
WHEELS=(openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6)

if [[ "${1:-}" == "--prepare" ]]; then
    mkdir -p .whl "$DATA"
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_5_x86_64 \
        -d .whl "${WHEELS[@]}"
    cp "${GPFM_DATA_DIR:-../shared/data}"/cmu_small_region.svs "${GPFM_DATA_DIR:-../shared/data}"/he_patch_1000.png "$DATA"/
    du -sh .whl "$DATA"
    echo "ready: run 'bash benchmarks/gpu_check.sh' on the device with carry [.whl, $DATA]"
    exit 0
fi

# Install what the image lacks, from the carried wheels only (the device has no network).
if ! "$PY" -c "import openslide, imagecodecs, h5py, timm, tifffile" 2>/dev/null; then
    if ! compgen -G ".whl/*.whl" >/dev/null; then
        echo "gpu_check: openslide/imagecodecs missing and no .whl/: run benchmarks/gpu_check.sh --prepare" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/gpfm_site .whl/*.whl
    export PYTHONPATH=/tmp/gpfm_site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[[ -d "$DATA" ]] && export GPFM_DATA_DIR=${GPFM_DATA_DIR:-$PWD/$DATA}

status=0
log=${OUT:-bench_out}/gpu_check.log
mkdir -p "$(dirname "$log")"
timeout 330 "$PY" benchmarks/gpu_check.py "$@" 2>&1 | tee "$log" || status=$?
if [[ " $* " == *" --tiny "* ]]; then
    echo "--- --tiny: benchmarks/gpu_train_check.py not run (it needs the GPU)"
elif [[ -f benchmarks/gpu_train_check.py ]]; then
    echo "--- benchmarks/gpu_train_check.py"
    timeout 130 "$PY" benchmarks/gpu_train_check.py 2>&1 | tee -a "$log" || status=$?
fi
exit $status
