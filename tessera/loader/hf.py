"""HF model folders: `config.json` and safetensors weights, single file or sharded with an index."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tessera.loader.lazy import LazySlice, safetensors_slice
from tessera.model_config import ModelConfig


def read_json(folder: str | Path) -> dict[str, Any]:
    """The folder's `config.json` as it is (its `quantization_config` included)."""
    return json.loads((Path(folder) / "config.json").read_text())


def read_config(folder: str | Path) -> ModelConfig:
    return ModelConfig.from_hf(read_json(folder))


def weight_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / s for s in shards]
    single = folder / "model.safetensors"
    if single.exists():
        return [single]
    raise FileNotFoundError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def weights(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, f.get_tensor(name)


def weight_slices(folder: str | Path) -> Iterator[tuple[str, LazySlice]]:
    """Every tensor as a lazy slice: a TP rank narrows each to its part before anything is read. Each
    is valid until the next is drawn (its file is closed after its last tensor)."""
    from safetensors import safe_open

    for path in weight_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                yield name, safetensors_slice(f, name)
