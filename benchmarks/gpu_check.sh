#!/usr/bin/env bash
# GPU acceptance checks for one device call on one H200 (16 CPU cores, no network).
#
#   benchmarks/gpu_check.sh --prepare  HERE (PyPI reachable), in the checkout the device call
#                                      sends: wheels the device lacks -> .whl/, sample images
#                                      -> bench_out/gpu_data/ (both git-ignored and carried),
#                                      checks the 64 MiB limit, prints the one `run` call:
#       run {"command": "bash benchmarks/gpu_check.sh", "carry": [".whl", "bench_out/gpu_data"],
#            "timeout_s": 500}
#   benchmarks/gpu_check.sh            on the device: every part below, in order
#   benchmarks/gpu_check.sh --only train,cohort   a rerun of some parts
#   benchmarks/gpu_check.sh --tiny     CPU dry run of every part at tiny sizes (here)
#   benchmarks/gpu_check.sh --budget   print the time plan and exit
#
# Time plan (seconds). Each part gets its budget plus what the parts before it left unused; it
# stops itself within that (skipping what would not fit, its table still written) and runs
# under a hard `timeout` of it, so one that hangs cannot starve the next; expected times are
# estimates for the H200 machine, not readings:
#   part    budget  expected  what
#   setup       30        10  pip-install the carried wheels into /tmp/gpfm_site
#   embed      120        70  benchmarks/gpu_check.py: model-only tiles/s of the GPFM ViT-L
#                             (target >= 2,000), bf16-vs-fp32 cosine (>= 0.999), end-to-end
#                             embed_slides on 4 generated 30,000 px slides (>= 1,500 tiles/s)
#   train      150        80  benchmarks/gpu_train_check.py: the gpfm recipe's ViT-L/14 student
#                             with UNI-, Phikon- and CONCH-shaped random experts, batch 32 and
#                             96: steps/s, peak memory (issue 12)
#   cohort     150        85  benchmarks/gpu_cohort_check.py: gpfm embed cohort.csv inline,
#                             --cluster local:2 and local:1 on the GPU, tiles/s side by side
#                             (issue 11)
#   total      450       245  -> the call's timeout_s 500 (the limit is 600; each part may be
#                             killed 10 s past its budget)
# Device time (15 min a session, start and idle included): a start costs 1-2 min, so the first
# call takes ~6 min expected and under 10 at worst. A rerun fits only for some parts: rerun
# those that failed or were cut (--only PART[,PART]; each part stands alone: cohort generates
# the big slides embed would have left, and leaves out those not ready in time) with
# timeout_s = the sum of their budgets + 50.
#
# What comes back from $OUT (8 files at most): gpu_check.log (everything), gpu_summary.md (the
# tables, also printed last so they are in the reply's output tail).
set -uo pipefail
cd "$(dirname "$0")/.."

declare -A BUDGET=([setup]=30 [embed]=120 [train]=150 [cohort]=150)
PARTS=(embed train cohort)

budget() {
    local total=${BUDGET[setup]} p
    for p in "$@"; do total=$((total + BUDGET[$p])); done
    echo "time plan (s)${TINY[0]:+ (--tiny: 3x the device budgets)}: setup ${BUDGET[setup]}$(for p in "$@"; do printf ', %s %s' "$p" "${BUDGET[$p]}"; done); total $total (call timeout_s $((total + 50)))"
}

if [[ -x .venv/bin/python && -z "${PYTHON:-}" ]]; then PY=.venv/bin/python; else PY=${PYTHON:-python3}; fi
TINY=()
case "${1:-}" in
    --prepare) exec "$PY" benchmarks/gpu_prepare.py "${@:2}" ;;
    --budget) budget "${PARTS[@]}"; exit 0 ;;
    --tiny)  # this 2-core CPU machine is far slower than the device: 3x the budgets
        TINY=(--tiny)
        for p in "${!BUDGET[@]}"; do BUDGET[$p]=$((3 * BUDGET[$p])); done ;;
    --only)
        IFS=, read -r -a PARTS <<<"${2:?--only needs parts, e.g. --only train,cohort}"
        for p in "${PARTS[@]}"; do
            [[ -n "${BUDGET[$p]:-}" && $p != setup ]] || { echo "gpu_check: unknown part $p (embed, train, cohort)" >&2; exit 2; }
        done ;;
    "") ;;
    *) echo "gpu_check: unknown option $1 (--prepare, --tiny, --only PARTS, --budget)" >&2; exit 2 ;;
esac

OUTDIR=${OUT:-bench_out}
mkdir -p "$OUTDIR"
LOG=$OUTDIR/gpu_check.log
MD=$OUTDIR/gpu_summary.md
: >"$LOG"
rm -f "$MD"
budget "${PARTS[@]}" | tee -a "$LOG"

# setup: install what the image lacks from the carried wheels only (the device has no network)
if [[ ${#TINY[@]} -eq 0 ]]; then
    if compgen -G ".whl/*.whl" >/dev/null; then
        t0=$SECONDS
        timeout "${BUDGET[setup]}" "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
            --upgrade --target /tmp/gpfm_site .whl/*.whl 2>&1 | tee -a "$LOG"
        [[ ${PIPESTATUS[0]} -eq 0 ]] || { echo "gpu_check: installing .whl/ failed" | tee -a "$LOG"; exit 2; }
        export PYTHONPATH=/tmp/gpfm_site${PYTHONPATH:+:$PYTHONPATH}
        echo "--- setup: wheels installed in $((SECONDS - t0)) s" | tee -a "$LOG"
    elif ! "$PY" -c "import openslide, imagecodecs, distributed" 2>/dev/null; then
        echo "gpu_check: openslide/imagecodecs/distributed missing and no .whl/: run benchmarks/gpu_check.sh --prepare here first" >&2
        exit 2
    fi
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
[[ -d bench_out/gpu_data ]] && export GPFM_DATA_DIR=${GPFM_DATA_DIR:-$PWD/bench_out/gpu_data}
if [[ ${#TINY[@]} -eq 0 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv 2>&1 | tee -a "$LOG"
fi

declare -A SCRIPT=([embed]=gpu_check.py [train]=gpu_train_check.py [cohort]=gpu_cohort_check.py)
# One deadline for the parts: each gets its own budget plus what the parts before it left
# unused, so the whole stays within the plan; the script stops itself within that (--budget-s)
# and `timeout` kills it (its whole process group: DataLoader and dask workers too) at it.
deadline=$SECONDS
for p in "${PARTS[@]}"; do deadline=$((deadline + BUDGET[$p])); done
status=0
for i in "${!PARTS[@]}"; do
    p=${PARTS[$i]}
    later=0
    for q in "${PARTS[@]:$((i + 1))}"; do later=$((later + BUDGET[$q])); done
    part_s=$((deadline - SECONDS - later))
    echo "--- $p: benchmarks/${SCRIPT[$p]} (budget $part_s s)" | tee -a "$LOG"
    t0=$SECONDS
    timeout -k 10 "$part_s" "$PY" "benchmarks/${SCRIPT[$p]}" "${TINY[@]}" --budget-s "$part_s" --md "$MD" 2>&1 | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    [[ $rc -eq 124 || $rc -eq 137 ]] && echo "gpu_check: $p ran past its $part_s s budget: killed" | tee -a "$LOG"
    echo "--- $p: exit $rc after $((SECONDS - t0)) s" | tee -a "$LOG"
    [[ $rc -eq 0 ]] || status=1
done

echo "=== summary (exit $status)"
[[ -f "$MD" ]] && cat "$MD"
exit $status
