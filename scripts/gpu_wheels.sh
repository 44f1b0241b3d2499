#!/usr/bin/env bash
# Run on a machine with PyPI, before a GPU session: downloads into .whl/ (git-ignored) the wheels the GPU image lacks,
# for its Python 3.12 on manylinux x86_64 — TRL 1.16 and datasets (the bench's comparison), datasets' needs that the
# image does not have (dill, multiprocess), and bitsandbytes (QLoRA; its wheel holds the CUDA 13 library). The image
# already has torch, transformers, accelerate, peft, pyarrow, pandas, xxhash, fsspec, huggingface-hub and
# pytest-timeout. scripts/gpu_check.sh installs .whl/ there with no network. About 45 MB, within the 64 MiB that a
# device call may carry.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2)
PYTHON=${PYTHON:-python3}
PLATFORMS=()
for platform in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
    manylinux2014_x86_64 manylinux1_x86_64; do
    PLATFORMS+=(--platform "$platform")
done

rm -rf .whl && mkdir .whl
"$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "${WHEELS[@]}"
ls -l .whl
echo "$(du -sm .whl | cut -f1) MB in .whl/; on a GPU session: run(command='bash scripts/gpu_check.sh', carry=['.whl'])"
