#!/usr/bin/env bash
# The trainer's GPU check: one command for a GPU machine with no network (see bench/gpu_check.py).
#
#   bench/gpu_check.sh --fetch-wheels   here, with network: the packages the GPU image lacks, into .whl/
#   bench/gpu_check.sh                  there: installs .whl/ into /tmp/site, runs, writes bench/results/gpu_check.json
#
# The GPU image brings torch, transformers, accelerate, safetensors and triton (python 3.12);
# TuneDock's training code also needs peft, bitsandbytes and protobuf (the job protos), and
# uses liger-kernel's fused kernels where they are installed.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=.whl
PACKAGES=(peft==0.21.2 bitsandbytes==0.50.2 protobuf==7.36.2 liger-kernel==0.6.4)
if [ "${1:-}" = "--fetch-wheels" ]; then
  mkdir -p "$WHEELS"
  grep -qx "/$WHEELS/" .git/info/exclude 2>/dev/null || echo "/$WHEELS/" >> .git/info/exclude
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d "$WHEELS" "${PACKAGES[@]}"
  echo "wheels in $WHEELS/: carry it to the GPU machine beside the repository"
  exit 0
fi
if compgen -G "$WHEELS/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
exec python3 -m bench.gpu_check "$@"
