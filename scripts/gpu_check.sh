#!/usr/bin/env bash
# The device command: one GPU machine whose image has torch, transformers, accelerate, peft, triton
# and rich but not all of lrft's dependencies. Installs what is missing (scripts/gpu_wheels.txt) from
# the wheels carried in wheels/ (no network) into a --target folder, then runs scripts/gpu_check.py,
# which writes the report row by row to $OUT/gpu.md when $OUT is set (else docs/gpu.md) and prints
# each table as soon as a row of it is done (about 5-7 minutes at 7B shapes).
#
#   bash scripts/gpu_check.sh --wheels wheels [gpu_check.py options, e.g. --budget-s 420 --sections env,steps]
#
# How to build wheels/ (git-ignored; carry=["wheels"], 43 MB): docs/gpu.md. The CPU smoke run of this
# exact command is tests/test_gpu_check.py (OUT=tmp, --tiny).
set -uo pipefail

cd "$(dirname "$0")/.."
wheels=""
args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --wheels) wheels="$2"; shift 2 ;;
        --wheels=*) wheels="${1#--wheels=}"; shift ;;
        *) args+=("$1"); shift ;;
    esac
done

site="${GPU_CHECK_SITE:-/tmp/lrft-site}"
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
while read -r spec module _rest; do  # "dist==version module", comments and blank lines skipped
    case "$spec" in ''|'#'*) continue ;; esac
    python3 -c "import $module" 2>/dev/null && continue
    if [ -z "$wheels" ] || [ ! -d "$wheels" ]; then
        echo "gpu_check.sh: $spec is missing and no --wheels DIR to install it from" >&2
        continue
    fi
    # one at a time: a missing wheel stops nothing else (its rows read "error: ...")
    python3 -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        --find-links "$wheels" "$spec" || echo "gpu_check.sh: could not install $spec from $wheels" >&2
done < scripts/gpu_wheels.txt

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
timeout 520 python3 scripts/gpu_check.py "${args[@]}"
rc=$?
echo "gpu_check.sh: exit $rc; report in ${OUT:-docs}/gpu.md"
exit $rc
