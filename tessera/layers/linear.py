"""Linear layers sharded over the TP ranks, with a pluggable weight format.

A layer computes the [out, in] product of one logical matrix; how that matrix is stored is its
`LinearMethod`'s business (plain weights here; packed or block-scaled formats plug in the same way).
Each stored parameter carries a `ShardSpec` that says which of its dims runs along the output and the
input and how many logical elements one stored element covers there, so one generic `weight_loader`
slices any format out of a full checkpoint tensor:

* `ColumnParallelLinear`: output rows split over ranks (`MergedColumnParallelLinear`: gate/up, each part
  split on its own; `QKVParallelLinear`: heads split, KV heads replicated when fewer than ranks);
* `RowParallelLinear`: input split, partial sums all-reduced (`tessera.distributed.comm`);
* `ReplicatedLinear`: every rank holds it all.

With one rank each equals `nn.Linear` bit for bit (the same `F.linear` call on the same weights).

Models take their formats from a `MethodFor` callable, asked once per layer with the layer's HF checkpoint
module name (None: plain weights); MoE experts ask it too, for an `ExpertsMethod`, and the embedding and
the head for a `VocabMethod` (`tessera.layers.vocab_parallel`). Loaders may hand `weight_loader` a
`LazyTensor` in place of a tensor (a safetensors slice not read yet): each rank narrows it to its slice,
then reads only that.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypeAlias

import torch
import torch.nn.functional as F
from torch import nn

from tessera.distributed.comm import all_gather, all_reduce, all_reduce_placement
from tessera.distributed.state import tp_group, tp_rank, tp_size

try:
    from tessera.layers import gemv
except ImportError:  # no Triton (a CPU-only install): F.linear everywhere
    gemv = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from tessera.layers.expert_format import ExpertsMethod
    from tessera.layers.vocab_parallel import VocabMethod

ShardId = str | int | None


class LazyTensor(Protocol):
    """A checkpoint tensor not read yet: narrowing it costs nothing, `materialize` reads what is left."""

    @property
    def shape(self) -> torch.Size: ...

    def narrow(self, dim: int, start: int, length: int) -> LazyTensor: ...

    def materialize(self) -> torch.Tensor: ...


Loaded: TypeAlias = torch.Tensor | LazyTensor


def materialize(t: Loaded) -> torch.Tensor:
    return t if isinstance(t, torch.Tensor) else t.materialize()


@dataclass(frozen=True)
class ShardSpec:
    """How a stored parameter maps onto its layer's logical [out, in] matrix.

    `output_dim` / `input_dim`: the parameter's dim along the output / input features (None: it does
    not run along that axis, e.g. a per-channel scale has no input dim). `output_pack` / `input_pack`:
    logical elements one stored element covers there (2 for two 4-bit inputs per byte, 128 for a
    128x128 block scale). `per_shard`: one scalar per fused part (the per-tensor scales of a fused layer).
    """

    output_dim: int | None = 0
    input_dim: int | None = 1
    output_pack: int = 1
    input_pack: int = 1
    per_shard: bool = False


def set_shard_spec(param: nn.Parameter, spec: ShardSpec) -> nn.Parameter:
    param.shard_spec = spec  # type: ignore[attr-defined]
    return param


def shard_spec(param: torch.Tensor) -> ShardSpec:
    spec = getattr(param, "shard_spec", None)
    if spec is None:
        raise TypeError("parameter has no ShardSpec: a LinearMethod must set one on each it creates")
    return spec


class LinearMethod(ABC):
    """A weight format: what parameters a linear layer stores and how it multiplies with them."""

    @abstractmethod
    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        """Register this rank's parameters on `layer` (sizes are per rank; `layer.output_sizes` has the
        fused parts), each with a ShardSpec (`set_shard_spec`)."""

    def process_weights_after_loading(self, layer: nn.Module) -> None:  # noqa: B027 (optional hook)
        """Repack once after every tensor is loaded (a kernel's layout); nothing by default."""

    @abstractmethod
    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [T, in] -> [T, out] of this rank's slice."""


# the weight format of the module whose HF checkpoint name is given, e.g. "model.layers.0.mlp.down_proj";
# None: plain weights. Fused layers are asked under their fused name ("...self_attn.qkv_proj" for
# q_proj/k_proj/v_proj, "...mlp.gate_up_proj" for gate_proj/up_proj); MoE experts as "...mlp.experts",
# for an ExpertsMethod; the embedding and the head as "model.embed_tokens" and "lm_head", for a
# VocabMethod (`tessera.quant.config.QuantConfig` is one).
MethodFor: TypeAlias = "Callable[[str], LinearMethod | ExpertsMethod | VocabMethod | None]"


def method_at(method_for: MethodFor | None, prefix: str, name: str) -> LinearMethod | None:
    """The format `method_for` picks for linear layer `name` of module `prefix` (None: plain weights)."""
    full = child_name(prefix, name)
    method = None if method_for is None else method_for(full)
    if method is not None and not isinstance(method, LinearMethod):
        raise TypeError(f"{full} is a linear layer; its format is a {type(method).__name__}")
    return method


def child_name(prefix: str, name: str) -> str:
    """A submodule's HF name: "model.layers.0" + "mlp" -> "model.layers.0.mlp"."""
    return f"{prefix}.{name}" if prefix else name


class UnquantizedLinearMethod(LinearMethod):
    """`weight` [out, in] in the model's dtype."""

    def create_weights(
        self, layer: nn.Module, in_features: int, out_features: int, dtype: torch.dtype
    ) -> None:
        weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        layer.register_parameter("weight", set_shard_spec(weight, ShardSpec(output_dim=0, input_dim=1)))

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        # decode-sized calls stream the weight through `gemv` where this card's tuned table says that
        # beats cuBLAS for its shape; decided here, once, outside any traced or captured forward
        layer.decode_gemv = gemv is not None and gemv.tuned_for(layer.weight)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if getattr(layer, "decode_gemv", False):
            return gemv.dense_linear(x, layer.weight, bias)
        return F.linear(x, layer.weight, bias)


@dataclass(frozen=True)
class _Part:
    """One fused part along the output: `size` logical rows at `dst` in this rank's parameter, taken from
    row `src` of the checkpoint tensor."""

    dst: int
    src: int
    size: int


class LinearBase(nn.Module):
    """The loading and bookkeeping the layers share; subclasses say which slice this rank holds."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        parts: dict[ShardId, _Part],
        in_part: tuple[int, int] | None,
        bias: bool,
        dtype: torch.dtype | None,
        method: LinearMethod | None,
    ) -> None:
        super().__init__()
        self.input_size, self.output_size = input_size, output_size  # logical, all ranks together
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        # NOTE: one rank and no process group: the plain layer, bit for bit; a process group of one rank
        # runs the parallel path with its collectives (how the parallel path is tested on one GPU)
        self.distributed = self.tp_size > 1 or tp_group() is not None
        self._parts, self._in_part = parts, in_part  # in_part: (checkpoint offset, size) of the input
        self.output_sizes = [p.size for p in parts.values()]  # this rank's, per fused part
        self.in_features = in_part[1] if in_part else input_size
        self.out_features = sum(self.output_sizes)
        self.method = method or UnquantizedLinearMethod()
        dtype = dtype or torch.get_default_dtype()
        self.method.create_weights(self, self.in_features, self.out_features, dtype)
        self.register_parameter("bias", None)
        if bias:
            bias_param = nn.Parameter(torch.empty(self.out_features, dtype=dtype), requires_grad=False)
            self.bias = set_shard_spec(bias_param, ShardSpec(output_dim=0, input_dim=None))
        for param in self.parameters(recurse=False):
            shard_spec(param)  # fail at build, not at load, on a method that forgot one
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
        self.loaded_shards: set[tuple[str, ShardId]] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.apply(self, x, self.bias)

    @torch.no_grad()
    def weight_loader(self, param: nn.Parameter, loaded: Loaded, shard_id: ShardId = None) -> None:
        """Copy this rank's slice of the FULL checkpoint tensor `loaded` into `param` — the part
        `shard_id` of a fused layer ("q"/"k"/"v", a gate/up index), or every part at once when None."""
        name, spec = self._name_of(param), shard_spec(param)
        if shard_id is not None and shard_id not in self._parts:
            raise ValueError(f"unknown shard {shard_id!r} for {type(self).__name__}: {list(self._parts)}")
        ids = list(self._parts) if shard_id is None else [shard_id]
        if spec.per_shard:
            self._load_slots(name, param, loaded, ids)
        elif shard_id is None and None not in self._parts and spec.output_dim is not None:
            for sid, piece in zip(ids, self._split_fused(name, loaded, spec), strict=True):
                self._load(name, param, piece, spec, self._parts[sid])
        else:
            self._load(name, param, loaded, spec, self._parts.get(shard_id))
        self.loaded_shards.update((name, sid) for sid in ids)

    def missing_shards(self) -> list[str]:
        """Parameters (`name`, or `name#shard` of a fused one) no checkpoint tensor was loaded into."""
        return [
            name if sid is None else f"{name}#{sid}"
            for name, _ in self.named_parameters(recurse=False)
            for sid in self._parts
            if (name, sid) not in self.loaded_shards
        ]

    def process_weights_after_loading(self) -> None:
        self.method.process_weights_after_loading(self)

    def _load(self, name: str, param: torch.Tensor, src: Loaded, spec: ShardSpec, part: _Part | None) -> None:
        dst = param
        if spec.output_dim is not None and part is not None:
            dst = _narrow(dst, spec.output_dim, spec.output_pack, part.dst, part.size, f"{name} (parameter)")
            src = _narrow(src, spec.output_dim, spec.output_pack, part.src, part.size, f"{name} (checkpoint)")
        if spec.input_dim is not None and self._in_part is not None:
            src = _narrow(src, spec.input_dim, spec.input_pack, *self._in_part, f"{name} (checkpoint)")
        if dst.shape != src.shape:
            raise ValueError(
                f"{type(self).__name__}.{name}: this rank's slice of the checkpoint tensor is "
                f"{tuple(src.shape)}, the parameter holds {tuple(dst.shape)}"
            )
        dst.copy_(materialize(src))

    def _load_slots(self, name: str, param: torch.Tensor, loaded: Loaded, ids: list[ShardId]) -> None:
        loaded = materialize(loaded)
        if loaded.numel() != 1 or param.numel() != len(self._parts):
            raise ValueError(
                f"{type(self).__name__}.{name} holds one scalar per fused part ({len(self._parts)}): "
                f"got a checkpoint tensor of shape {tuple(loaded.shape)} for a parameter of {param.numel()}"
            )
        keys = list(self._parts)
        for sid in ids:
            param.view(-1)[keys.index(sid)].copy_(loaded.reshape(()))

    def _split_fused(self, name: str, loaded: Loaded, spec: ShardSpec) -> list[Loaded]:
        """A checkpoint tensor whose parts are already fused, cut into the full parts."""
        assert spec.output_dim is not None
        full = [self._full_size(sid) for sid in self._parts]
        starts = [sum(full[:i]) for i in range(len(full))]
        return [
            _narrow(loaded, spec.output_dim, spec.output_pack, s, n, name)
            for s, n in zip(starts, full, strict=True)
        ]

    def _full_size(self, shard_id: ShardId) -> int:
        return self.output_size

    def _name_of(self, param: torch.Tensor) -> str:
        for name, own in self.named_parameters(recurse=False):
            if own is param:
                return name
        raise ValueError(f"the tensor passed to weight_loader is no parameter of this {type(self).__name__}")


def _narrow(t: Loaded, dim: int, pack: int, start: int, size: int, what: str) -> Loaded:
    """Logical elements [start, start + size) along `dim` of a tensor storing `pack` of them per element
    (a partial last element rounds up: the tail block of a block scale)."""
    if start % pack:
        raise ValueError(f"{what}: offset {start} along dim {dim} is not a multiple of its packing {pack}")
    begin, end = start // pack, -(-(start + size) // pack)
    if end > t.shape[dim]:
        raise ValueError(f"{what}: needs {end} elements along dim {dim}, the tensor has {t.shape[dim]}")
    return t.narrow(dim, begin, end - begin)


def _divide(n: int, world: int, what: str) -> int:
    if n % world:
        raise ValueError(f"{what}={n} is not divisible by the TP size {world}")
    return n // world


class ReplicatedLinear(LinearBase):
    """The whole matrix on every rank (a router, a small projection)."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        *,
        dtype: torch.dtype | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        super().__init__(input_size, output_size, {None: _Part(0, 0, output_size)}, None, bias, dtype, method)


class ColumnParallelLinear(LinearBase):
    """Output features split over the ranks: rank r computes rows [r*out/tp, (r+1)*out/tp).
    `gather_output` concatenates the ranks' outputs (all-gather); otherwise each keeps its slice."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        *,
        gather_output: bool = False,
        dtype: torch.dtype | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        local = _divide(output_size, tp_size(), "output_size")
        parts = {None: _Part(0, tp_rank() * local, local)}
        super().__init__(input_size, output_size, parts, None, bias, dtype, method)
        self.gather_output = gather_output

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.method.apply(self, x, self.bias)
        return all_gather(out, dim=-1) if self.gather_output else out


class MergedColumnParallelLinear(LinearBase):
    """Several column-parallel matrices fused along the output (gate_up: `output_sizes=[I, I]`), each
    split on its own, so rank r holds [gate_r; up_r]. Shard ids are the parts' indices."""

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        self.full_sizes = list(output_sizes)
        local = [_divide(n, tp_size(), f"output_sizes[{i}]") for i, n in enumerate(output_sizes)]
        parts = {i: _Part(sum(local[:i]), tp_rank() * n, n) for i, n in enumerate(local)}
        super().__init__(input_size, sum(output_sizes), parts, None, bias, dtype, method)

    def _full_size(self, shard_id: ShardId) -> int:
        assert isinstance(shard_id, int)
        return self.full_sizes[shard_id]


class QKVParallelLinear(LinearBase):
    """Q, K and V fused, heads split over the ranks (shard ids "q", "k", "v"). With fewer KV heads than
    ranks each KV head is replicated: rank r holds the one its query heads attend with.
    `num_heads` / `num_kv_heads` / `q_size` / `kv_size` are this rank's, for the attention layer."""

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        bias: bool = False,
        *,
        dtype: torch.dtype | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        world, rank = tp_size(), tp_rank()
        total_kv = num_kv_heads or num_heads
        self.head_dim, self.total_num_heads, self.total_num_kv_heads = head_dim, num_heads, total_kv
        self.num_heads = _divide(num_heads, world, "num_heads")
        if total_kv >= world:
            self.num_kv_heads, self.num_kv_head_replicas = _divide(total_kv, world, "num_kv_heads"), 1
            kv_head = rank * self.num_kv_heads
        elif world % total_kv:
            raise ValueError(f"TP size {world} must be a multiple of num_kv_heads={total_kv} (fewer heads)")
        else:  # each KV head serves tp/num_kv consecutive ranks, which hold its query heads
            self.num_kv_heads, self.num_kv_head_replicas = 1, world // total_kv
            kv_head = rank // self.num_kv_head_replicas
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        parts = {
            "q": _Part(0, rank * self.q_size, self.q_size),
            "k": _Part(self.q_size, kv_head * head_dim, self.kv_size),
            "v": _Part(self.q_size + self.kv_size, kv_head * head_dim, self.kv_size),
        }
        output_size = (num_heads + 2 * total_kv) * head_dim
        super().__init__(hidden_size, output_size, parts, None, bias, dtype, method)

    def _full_size(self, shard_id: ShardId) -> int:
        return (self.total_num_heads if shard_id == "q" else self.total_num_kv_heads) * self.head_dim


class RowParallelLinear(LinearBase):
    """Input features split over the ranks (the input arrives already split, e.g. attention heads);
    `reduce_results` sums the partial products (all-reduce) and adds the bias once, after the sum.
    Without it rank 0 alone adds the bias, so a later reduce still counts it once."""

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = True,
        *,
        reduce_results: bool = True,
        dtype: torch.dtype | None = None,
        method: LinearMethod | None = None,
    ) -> None:
        local = _divide(input_size, tp_size(), "input_size")
        in_part = (tp_rank() * local, local)
        whole = {None: _Part(0, 0, output_size)}
        super().__init__(input_size, output_size, whole, in_part, bias, dtype, method)
        self.reduce_results = reduce_results
        self.placement = all_reduce_placement()  # NOTE: read once, at build: the graphs are cut by it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return self.method.apply(self, x, self.bias)
        if not self.reduce_results:
            return self.method.apply(self, x, self.bias if self.tp_rank == 0 else None)
        out = all_reduce(self.method.apply(self, x, None), self.placement)
        return out if self.bias is None else out + self.bias
