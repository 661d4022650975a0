"""Loading HF-named checkpoint tensors into a model built of this package's layers, on any TP rank.

Each tensor goes to its parameter's `weight_loader`, which copies this rank's slice: fused projections
take their parts by shard id ("q"/"k"/"v" of qkv_proj, 0/1 of gate_up_proj), experts by `(expert,
part)`. A tensor may be a `LazyTensor` (a safetensors slice not read yet): a rank then reads only what
it keeps, and nothing at all of another rank's experts. Parameters with no loader of their own (norms,
routers) are whole on every rank.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from tessera.layers.linear import LinearBase, Loaded, ShardId, materialize
from tessera.model_config import ModelConfig

# (fused parameter, HF parameter, shard) — shard is q/k/v or the index in gate/up.
_STACKED = (
    ("qkv_proj", "q_proj", "q"),
    ("qkv_proj", "k_proj", "k"),
    ("qkv_proj", "v_proj", "v"),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
_EXPERT_PART = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None, "down_proj": None}

Shard = ShardId | tuple[int, int | None]


@torch.no_grad()
def load_hf_weights(model: nn.Module, cfg: ModelConfig, weights: Iterable[tuple[str, Loaded]]) -> None:
    """Load HF-named tensors into `model`'s parameters (this rank's slices), then let every linear layer
    repack its weights once (`process_weights_after_loading`). Raises KeyError on a tensor with no
    parameter and on parameters left unloaded, naming them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    plain: set[str] = set()  # parameters without a loader of their own that got their tensor
    for name, tensor in weights:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral checkpoints' older module name
        if "rotary_emb" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        target, shard = _target(name, params)
        if target not in params:
            raise KeyError(f"checkpoint tensor {name!r} has no parameter in {type(model).__name__}")
        param = params[target]
        loader = getattr(param, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, shard)
        else:
            _load_whole(target, param, tensor)
            plain.add(target)
    missing = _missing(model, plain)
    if missing:
        raise KeyError(f"checkpoint misses {len(missing)} tensors, e.g. {missing[:3]}")
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.process_weights_after_loading()


def _target(name: str, params: dict[str, nn.Parameter]) -> tuple[str, Shard]:
    """The parameter a checkpoint tensor loads into, and which part of it."""
    if name in params:  # as it is (MLA's own q_proj, HF's fused expert tensors, norms, ...)
        return name, None
    if ".experts." in name:
        return _expert_target(name)
    for fused, part, shard in _STACKED:
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    return name, None


def _expert_target(name: str) -> tuple[str, tuple[int, int | None] | None]:
    """A checkpoint's per-expert `experts.E.{w1,w3,w2}` / `{gate,up,down}_proj` tensor as (expert,
    part) of the fused `experts.gate_up_proj` / `experts.down_proj`."""
    match = _EXPERT.match(name)
    if match is None:
        return name, None
    prefix, expert, kind = match.groups()
    part = _EXPERT_PART[kind]
    return f"{prefix}.{'down_proj' if part is None else 'gate_up_proj'}", (int(expert), part)


def _load_whole(name: str, param: torch.Tensor, tensor: Loaded) -> None:
    if param.shape != tensor.shape:
        raise ValueError(
            f"{name}: shape mismatch: parameter {tuple(param.shape)} vs checkpoint {tuple(tensor.shape)}"
        )
    param.copy_(materialize(tensor))


def _missing(model: nn.Module, plain: set[str]) -> list[str]:
    """What no checkpoint tensor filled: a layer's own account where it keeps one (`missing_shards`:
    fused parts, experts, a tied head), else each parameter by name."""
    missing = []
    for module_name, module in model.named_modules():
        dot = f"{module_name}." if module_name else ""
        if hasattr(module, "missing_shards"):
            missing += [dot + m for m in module.missing_shards()]
            continue
        for name, _ in module.named_parameters(recurse=False):
            if dot + name not in plain:
                missing.append(dot + name)
    return missing
