#!/usr/bin/env bash
# The GPU check in one command, for a machine with a CUDA GPU and no network (README.md, "GPU"):
#   1. installs the wheels carried in .whl/ (made beforehand by scripts/gpu_wheels.sh on a machine with PyPI) into
#      a target folder with pip --no-index, and puts that folder first on PYTHONPATH;
#   2. prints what the machine has (scripts/gpu_preflight.py: GPU, versions, requirements of the carried wheels
#      that it does not meet);
#   3. runs the GPU suite, `python -m pytest -m gpu tests/gpu`, with a timeout per test and a deadline for the whole
#      suite (pytest stops at it and still writes its summary and junit file), ending with the real-size bench.
# Everything it prints goes to $OUT/gpu_check.log; pytest's junit file to $OUT/gpu_junit.xml, the bench's table to
# $OUT/bench_dpo.txt. $OUT defaults to ./gpu_check_out. About 5 minutes on one H200; without CUDA every test is
# skipped, with its reason, in seconds.
#
# Settings (environment): PYTHON (python3), OUT, GPU_CHECK_WHEELS (.whl), GPU_CHECK_SITE (/tmp/nanodpo_site),
# GPU_CHECK_TEST_TIMEOUT (240 s per test), GPU_CHECK_DEADLINE (330 s for the whole suite).
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_out}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
SITE=${GPU_CHECK_SITE:-/tmp/nanodpo_site}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-240}
DEADLINE=${GPU_CHECK_DEADLINE:-330}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline
export WANDB_SILENT=true NANODPO_GPU_CHECK_OUT="$OUT"

check() {
    echo "== $(date +%T) gpu_check: commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'), $(uname -n)"
    local wheels=("$WHEELS"/*.whl)
    if [ -e "${wheels[0]}" ]; then
        echo "== $(date +%T) installing ${#wheels[@]} wheels from $WHEELS into $SITE (pip --no-index: no network)"
        "$PYTHON" -m pip install --isolated -q --root-user-action=ignore --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" || { echo "gpu_check: the wheels did not install"; return 3; }
        export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
        export NANODPO_GPU_CHECK_CARRIED="${wheels[*]}"
    else
        echo "== no wheels in $WHEELS: trl, datasets and bitsandbytes must already be installed (scripts/gpu_wheels.sh)"
    fi
    "$PYTHON" scripts/gpu_preflight.py || return 4

    local limits=()
    if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
        limits+=(--timeout "$TEST_TIMEOUT")
    else
        echo "== pytest-timeout is not installed: no per-test timeout (the suite's deadline still holds)"
    fi
    echo "== $(date +%T) the GPU suite (deadline ${DEADLINE}s)"
    local deadline=()
    command -v timeout >/dev/null && deadline=(timeout --signal=INT --kill-after=30 "$DEADLINE")
    "${deadline[@]}" "$PYTHON" -m pytest -m gpu tests/gpu -v -s -rs -p no:cacheprovider "${limits[@]}" \
        --junitxml "$OUT/gpu_junit.xml"
    local status=$?
    echo "== $(date +%T) gpu_check: pytest exit status $status"
    return $status
}

check 2>&1 | tee "$OUT/gpu_check.log"
exit "${PIPESTATUS[0]}"
