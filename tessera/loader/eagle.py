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
    path: str | Path,
    target: CausalLM,
    dtype: torch.dtype,
    device: torch.device | str,
    token_map: str | Path | None = None,
) -> EagleHead:
    """The head of folder `path` in `dtype` on `device`, sharing `target`'s embedding and lm_head;
    drafting from the tokens of `token_map` only, if given (`load_token_map`)."""
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
    if token_map is not None:
        head.restrict_vocab(load_token_map(token_map, target.config.vocab_size))
    return head.eval()


def load_token_map(path: str | Path, vocab_size: int) -> torch.Tensor:
    """A hot vocabulary: a 1-D tensor of distinct token ids saved with `torch.save` (the format of
    SGLang's --speculative-token-map and of FR-Spec's published `freq_32768.pt`)."""
    try:
        ids = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"token map {path}: no such file") from None
    except Exception as e:  # (an unpickling error names no file)
        raise ValueError(f"token map {path}: not a tensor saved with torch.save ({e})") from e
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.is_floating_point() or ids.numel() == 0:
        what = f"a {ids.dim()}-D {ids.dtype} tensor" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"token map {path}: {what}, expected a non-empty 1-D tensor of token ids")
    ids = ids.long()
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise ValueError(f"token map {path}: ids must be in [0, {vocab_size}) (the target's vocabulary)")
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"token map {path}: ids repeat")
    return ids


def _weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        yield from hf.weights(folder)
        return
    bin_file = folder / "pytorch_model.bin"
    if not bin_file.exists():
        raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")
    yield from torch.load(bin_file, map_location="cpu", weights_only=True).items()
