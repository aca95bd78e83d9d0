#!/usr/bin/env bash
# One command on one GPU machine (e.g. an H200 with torch, transformers, accelerate, peft and nothing
# else of lrft's): installs the missing pure-Python dependencies from wheels carried in the repo
# tree (no network), then runs scripts/gpu_check.py, which writes docs/gpu.md (about 4-6 minutes).
#
#   bash scripts/gpu_check.sh --wheels wheels [gpu_check.py options, e.g. --budget-s 420 --r 16]
#
# The wheels (not committed: wheels/ is git-ignored; give it to the device with carry=["wheels"],
# 44 MB in all), fetched once on a machine with PyPI access. antlr4 4.9.3 (what omegaconf 2.3 pins)
# is published as a source archive only: build it into a wheel so the device needs no build step.
#
#   pip download --no-deps -d wheels hydra-core==1.3.2 omegaconf==2.3.0 rich markdown-it-py mdurl pygments
#   pip wheel --no-deps -w wheels antlr4-python3-runtime==4.9.3
#   pip download --no-deps -d wheels --only-binary=:all: --python-version 3.11 \
#       --platform manylinux_2_24_x86_64 bitsandbytes       # 43 MB (0.50.2): the QLoRA-FA row
#
# Installed with --no-deps: their own dependencies (PyYAML, packaging, numpy) come with transformers.
# Without bitsandbytes the QLoRA-FA row reads "failed: ModuleNotFoundError" and the rest runs.
# A global budget (--budget-s, default 420 s) skips what is left with a note; `timeout` below is only
# the last resort against a hang: the report is rewritten after every row, so a kill keeps them.
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

# module to import -> distribution to install when it is missing
need=(
    "hydra:hydra-core" "omegaconf:omegaconf" "antlr4:antlr4-python3-runtime" "rich:rich"
    "markdown_it:markdown-it-py" "mdurl:mdurl" "pygments:pygments" "bitsandbytes:bitsandbytes"
)
missing=()
for pair in "${need[@]}"; do
    python -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ -z "$wheels" ] || [ ! -d "$wheels" ]; then
        echo "gpu_check.sh: missing ${missing[*]} and no --wheels DIR to install them from" >&2
    else
        for dist in "${missing[@]}"; do  # one at a time: a missing optional wheel stops nothing else
            pip install --quiet --no-deps --no-index --find-links "$wheels" "$dist" \
                || echo "gpu_check.sh: could not install $dist from $wheels" >&2
        done
    fi
fi

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
python -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), \
'transformers', transformers.__version__)"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
timeout 450 python scripts/gpu_check.py --out docs/gpu.md "${args[@]}"
rc=$?
echo "gpu_check.sh: exit $rc; report in docs/gpu.md"
exit $rc
