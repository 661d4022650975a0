"""Loading HF-named checkpoint tensors into a model built of this package's layers, on any TP rank.

Each tensor goes to its parameter's `weight_loader`, which copies this rank's slice: fused projections
take their parts by shard id ("q"/"k"/"v" of qkv_proj, 0/1 of gate_up_proj), experts by `(expert,
part)`. A tensor may be a `LazyTensor` (a safetensors slice not read yet): a rank then reads only what
it keeps, and nothing at all of another rank's experts. Parameters with no loader of their own (norms,
routers) are whole on every rank.
"""

from __future__ import annotations

import logging
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
_EXPERT = re.compile(
    r"^(.*\.experts)\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\."
    r"(weight|weight_scale|weight_scale_inv|input_scale|activation_scale)$"
)
_EXPERT_PART = {"w1": 0, "gate_proj": 0, "w3": 1, "up_proj": 1, "w2": None, "down_proj": None}
# a per-expert tensor's suffix -> the fused parameter's (`tessera.layers.expert_format`)
_EXPERT_SUFFIX = {"weight": "", "weight_scale": "_scale", "weight_scale_inv": "_scale_inv"}
# other names checkpoints give the same tensor (scales that multiply to dequantize; calibrated input scales)
_ALIASES = {
    "weight_scale_inv": "weight_scale",
    "weight_scale": "weight_scale_inv",
    "activation_scale": "input_scale",
}
# tensors a model may have no parameter for: calibrated activation and KV-cache scales (activations are
# quantized per token at run time, the KV cache is kept in the model's dtype)
_OPTIONAL = ("input_scale", "activation_scale", "k_scale", "v_scale")

Shard = ShardId | tuple[int, int | None]
log = logging.getLogger("tessera")


@torch.no_grad()
def load_hf_weights(model: nn.Module, cfg: ModelConfig, weights: Iterable[tuple[str, Loaded]]) -> None:
    """Load HF-named tensors into `model`'s parameters (this rank's slices), then let every module that
    has one run its `process_weights_after_loading` once (formats repack or quantize). Raises KeyError on
    a tensor with no parameter (calibrated activation and KV-cache scales excepted: unused) and on
    parameters left unloaded, naming them."""
    params = dict(model.named_parameters(remove_duplicate=False))
    plain: set[str] = set()  # parameters without a loader of their own that got their tensor
    skipped: set[str] = set()
    for name, tensor in weights:
        name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral checkpoints' older module name
        if "rotary_emb" in name or (name == "lm_head.weight" and cfg.tie_word_embeddings):
            continue
        target, shard = _target(name, params)
        if target not in params:
            if name.rsplit(".", 1)[-1] in _OPTIONAL:
                skipped.add(name.rsplit(".", 1)[-1])
                continue
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
    if skipped:
        log.info("checkpoint tensors not used (dynamic activation scales, KV cache in the model's dtype): %s",
                 ", ".join(sorted(skipped)))  # fmt: skip
    # linear layers first: a module's own step may read its layers' final weights (MLA's kv_b_proj)
    linears = [m for m in model.modules() if isinstance(m, LinearBase)]
    others = [m for m in model.modules() if not isinstance(m, LinearBase)]
    for module in linears + others:
        if hasattr(module, "process_weights_after_loading"):
            module.process_weights_after_loading()


def _target(name: str, params: dict[str, nn.Parameter]) -> tuple[str, Shard]:
    """The parameter a checkpoint tensor loads into, and which part of it (under an alias of its last
    name component where the model names it so)."""
    target, shard = _target_as_named(name, params)
    head, _, last = target.rpartition(".")
    alias = f"{head}.{_ALIASES[last]}" if last in _ALIASES else target
    return (alias, shard) if target not in params and alias in params else (target, shard)


def _target_as_named(name: str, params: dict[str, nn.Parameter]) -> tuple[str, Shard]:
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
    prefix, expert, kind, suffix = match.groups()
    part = _EXPERT_PART[kind]
    proj = "down_proj" if part is None else "gate_up_proj"
    if suffix not in _EXPERT_SUFFIX:  # a calibrated input scale: experts quantize activations per token
        return f"{prefix}.{expert}.{kind}.{suffix}", None
    return f"{prefix}.{proj}{_EXPERT_SUFFIX[suffix]}", (int(expert), part)


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
