#!/usr/bin/env bash
# Downloads the pure-Python wheels the GPU machine lacks into .wheels/ (git-ignored; pass it in
# `carry`). Run on a machine with PyPI access.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d .wheels \
  breakable-cuda-graphs==0.1.0
ls .wheels
