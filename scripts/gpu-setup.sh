#!/usr/bin/env bash
# Prepares a bare GPU machine that reaches no package registry: installs the wheels carried in
# .wheels/ (fetch them here with scripts/fetch-wheels.sh) and tessera itself, into the Python that
# already holds torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if compgen -G ".wheels/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --find-links .wheels .wheels/*.whl
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
"$PY" -c "import torch, tessera; print('tessera on', torch.__version__, torch.cuda.get_device_name())"
