"""EAGLE-1/2 draft heads from an HF-style folder: `config.json` (a one-layer Llama config, plus EAGLE's
`bias` flag for the fc layer) and `model.safetensors` or, as the published EAGLE heads ship,
`pytorch_model.bin`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from tessera.loader import hf
from tessera.model_config import ModelConfig
from tessera.models.decoder import CausalLM
from tessera.models.eagle import EagleHead

# EAGLE's own configs name the target's class; SGLang's converted ones their EAGLE class
_ARCHITECTURES = {"LlamaForCausalLM", "LlamaForCausalLMEagle", "EagleLlamaForCausalLM"}


def load_eagle_head(
    path: str | Path, target: CausalLM, dtype: torch.dtype, device: torch.device | str
) -> EagleHead:
    """The head of folder `path` in `dtype` on `device`, sharing `target`'s embedding and lm_head."""
    folder = Path(path)
    raw = json.loads((folder / "config.json").read_text())
    arch = (raw.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{folder}: {arch!r} is not an EAGLE-1 Llama head ({sorted(_ARCHITECTURES)})")
    cfg = ModelConfig.from_hf(raw | {"architectures": ["LlamaForCausalLM"]})
    # NOTE: EAGLE-LLaMA3-Instruct-8B's config says 2048 positions; its target serves 8192
    cfg = replace(
        cfg, max_position_embeddings=max(cfg.max_position_embeddings, target.config.max_position_embeddings)
    )
    with torch.device(device):
        head = EagleHead(cfg, fc_bias=raw.get("bias", True))  # absent: EAGLE's default, with bias
    head.load_weights(_weights(folder))
    head.to(dtype)  # before binding: the target's modules are not the head's to cast
    head.bind_target(target)
    return head.eval()


def _weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        yield from hf.weights(folder)
        return
    bin_file = folder / "pytorch_model.bin"
    if not bin_file.exists():
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    yield from torch.load(bin_file, map_location="cpu", weights_only=True).items()
