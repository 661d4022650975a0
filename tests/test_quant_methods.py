"""Quantized formats as LinearMethods / ExpertsMethods and the QuantConfig that picks them.

Every format (FP8 per-tensor / per-channel / block checkpoints, FP8 and MXFP4 online, MXFP4 checkpoints,
the five GGUF types) goes through every parallel layer at TP 1 and as each rank of TP 2 (built under a
simulated 2-rank state, loaded from the FULL checkpoint tensors): the rank's dequantized weight must equal
its slice of the full one bit for bit, and its output the float32 "dequantize, then matmul" reference.

Tolerances (relative Frobenius error): 1e-5 against that reference in float32 — the layers run the
very same dequantized values (FP8: and the same per-token activation quantization), so only summation
order differs (~1e-7 measured); 1e-2 for bfloat16 activations (the output rounds to bfloat16, 2^-9).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from tessera.distributed.state import as_rank
from tessera.graphs import GraphConfig, PiecewiseGraphRunner
from tessera.layers.expert_format import ExpertShape, ExpertsMethod
from tessera.layers.linear import (
    ColumnParallelLinear,
    LinearBase,
    LinearMethod,
    MergedColumnParallelLinear,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from tessera.layers.moe import moe_experts
from tessera.quant import fp8, gguf, mxfp4
from tessera.quant.config import ONLINE, QuantConfig
from tessera.quant.methods import (
    Fp8LinearMethod,
    GGUFLinearMethod,
    GGUFVocabMethod,
    Mxfp4LinearMethod,
    gguf_blocks,
)
from tessera.quant.moe_methods import Fp8ExpertsMethod, Mxfp4ExpertsMethod

from .conftest import rel_err

FN = torch.float8_e4m3fn
Tensors = dict[str, torch.Tensor]


def _randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------- formats


def _gguf_raw(ggml_type: str, n: int, k: int, seed: int) -> torch.Tensor:
    """Random valid blocks uint8 [n, bytes per row]: any value bits, small positive fp16 scales."""
    fmt = gguf.FORMATS[ggml_type]
    gen = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (n, k // fmt.block, fmt.block_bytes), generator=gen, dtype=torch.uint8)
    fields = {"Q8_0": (0, 2), "Q4_0": (0, 2), "Q4_1": (0, 4), "Q4_K": (0, 4), "Q6_K": (208, 210)}
    lo, hi = fields[ggml_type]
    halves = (hi - lo) // 2
    scales = (torch.rand(n, k // fmt.block, halves, generator=gen) * 9e-3 + 1e-3).half()
    blocks[..., lo:hi] = scales.view(torch.uint8)
    return blocks.reshape(n, -1)


@dataclass(frozen=True)
class Fmt:
    """`make(n, k, seed)` -> (the full checkpoint tensors of one matrix, the float32 weight they hold).
    `online`: what quantizing a rank's float weight gives (None: a checkpoint format)."""

    name: str
    method: Callable[[], LinearMethod]
    make: Callable[[int, int, int], tuple[Tensors, torch.Tensor]]
    online: Callable[[torch.Tensor], torch.Tensor] | None = None
    act_group: int | None = None  # FP8: activations quantized per token (0) or 1x128 group


def _fp8_ckpt(scheme: str) -> Callable[[int, int, int], tuple[Tensors, torch.Tensor]]:
    def make(n: int, k: int, seed: int) -> tuple[Tensors, torch.Tensor]:
        q, s = fp8.quantize_weight(_randn(n, k, seed=seed) * (seed + 1), scheme, FN)  # parts' scales differ
        name = "weight_scale_inv" if scheme == "block" else "weight_scale"
        return {"weight": q, name: s}, fp8.dequantize_weight(q, s, scheme)

    return make


def _float_ckpt(n: int, k: int, seed: int) -> tuple[Tensors, torch.Tensor]:
    w = _randn(n, k, seed=seed)
    return {"weight": w}, w


def _mxfp4_ckpt(n: int, k: int, seed: int) -> tuple[Tensors, torch.Tensor]:
    blocks, scales = mxfp4.quantize(_randn(n, k, seed=seed))
    return {"weight_blocks": blocks.view(n, k // 32, 16), "weight_scales": scales}, mxfp4.dequantize(
        blocks, scales
    )


def _gguf_ckpt(ggml_type: str) -> Callable[[int, int, int], tuple[Tensors, torch.Tensor]]:
    def make(n: int, k: int, seed: int) -> tuple[Tensors, torch.Tensor]:
        raw = _gguf_raw(ggml_type, n, k, seed)
        return {"weight": gguf_blocks(raw, ggml_type)}, gguf.dequantize(gguf.repack(raw, ggml_type, (n, k)))

    return make


def _fp8_online(scheme: str) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda w: fp8.dequantize_weight(*fp8.quantize_weight(w, scheme), scheme)


FORMATS = {
    f.name: f
    for f in [
        Fmt("fp8_per_tensor", lambda: Fp8LinearMethod("per_tensor", checkpoint=True), _fp8_ckpt("per_tensor"),
            act_group=0),
        Fmt("fp8_per_channel", lambda: Fp8LinearMethod("per_channel", checkpoint=True),
            _fp8_ckpt("per_channel"), act_group=0),
        Fmt("fp8_block", lambda: Fp8LinearMethod("block", checkpoint=True), _fp8_ckpt("block"),
            act_group=128),
        Fmt("fp8_online", lambda: Fp8LinearMethod("per_channel"), _float_ckpt, _fp8_online("per_channel"), 0),
        Fmt("fp8_block_online", lambda: Fp8LinearMethod("block"), _float_ckpt, _fp8_online("block"), 128),
        Fmt("mxfp4", lambda: Mxfp4LinearMethod(checkpoint=True), _mxfp4_ckpt),
        Fmt("mxfp4_online", Mxfp4LinearMethod, _float_ckpt, lambda w: mxfp4.dequantize(*mxfp4.quantize(w))),
        *(Fmt(f"gguf_{t}", lambda t=t: GGUFLinearMethod(t), _gguf_ckpt(t)) for t in sorted(gguf.FORMATS)),
    ]
}  # fmt: skip


@functools.cache
def _made(fmt: str, n: int, k: int, seed: int) -> tuple[Tensors, torch.Tensor]:
    """`make`, once per matrix: every rank of every TP size loads the same full tensors (read-only)."""
    return FORMATS[fmt].make(n, k, seed)


# ---------------------------------------------------------------------------------------- layers

HIDDEN = 256  # K of every layer: a whole number of blocks for every format (Q4_K/Q6_K: 256)


@dataclass(frozen=True)
class Case:
    """A layer, its parts' full shapes, and this rank's slice: (rows, cols) of each part."""

    build: Callable[[LinearMethod, torch.dtype], LinearBase]
    parts: list[tuple[str | int | None, int, int]]  # (shard id, rows, cols) of the full checkpoint parts
    slices: Callable[[int, int], list[tuple[slice, slice]]]  # (rank, tp) -> each part's slice
    bias: bool = False


def _rows(n: int, rank: int, tp: int) -> slice:
    return slice(rank * n // tp, (rank + 1) * n // tp)


ALL = slice(None)
CASES = {
    # 200 rows: the fp8 block scale's last row block is partial
    "replicated": Case(lambda m, d: ReplicatedLinear(HIDDEN, 200, bias=True, dtype=d, method=m),
                       [(None, 200, HIDDEN)], lambda r, tp: [(ALL, ALL)], bias=True),
    "column": Case(lambda m, d: ColumnParallelLinear(HIDDEN, 256, bias=True, dtype=d, method=m),
                   [(None, 256, HIDDEN)], lambda r, tp: [(_rows(256, r, tp), ALL)], bias=True),
    "merged": Case(lambda m, d: MergedColumnParallelLinear(HIDDEN, [256, 256], dtype=d, method=m),
                   [(0, 256, HIDDEN), (1, 256, HIDDEN)], lambda r, tp: [(_rows(256, r, tp), ALL)] * 2),
    # 4 query heads and 2 KV heads of 128: rank r of 2 holds query heads 2r, 2r + 1 and KV head r
    "qkv": Case(lambda m, d: QKVParallelLinear(HIDDEN, 128, 4, 2, dtype=d, method=m),
                [("q", 512, HIDDEN), ("k", 256, HIDDEN), ("v", 256, HIDDEN)],
                lambda r, tp: [(_rows(512, r, tp), ALL), (_rows(256, r, tp), ALL), (_rows(256, r, tp), ALL)]),
    "row": Case(lambda m, d: RowParallelLinear(512, HIDDEN, reduce_results=False, dtype=d, method=m),
                [(None, HIDDEN, 512)], lambda r, tp: [(ALL, _rows(512, r, tp))], bias=True),
}  # fmt: skip


def _load(layer: LinearBase, shard: str | int | None, tensors: Tensors) -> None:
    for name, tensor in tensors.items():
        layer.weight_loader(getattr(layer, name), tensor, shard)


@dataclass
class Built:
    layer: LinearBase
    weight: torch.Tensor  # this rank's expected float32 weight [out, in]
    bias: torch.Tensor | None  # this rank's expected bias
    cols: slice  # the input columns this rank reads


def _build(fmt: Fmt, case: Case, rank: int, tp: int, dtype: torch.dtype = torch.float32) -> Built:
    with as_rank(rank, tp):
        # NOTE: the dtype goes to the constructor: `Module.to(dtype)` would cast fp8 tensors too
        layer = case.build(fmt.method(), dtype)
    pieces = []
    for i, ((shard, n, k), (rows, cols)) in enumerate(zip(case.parts, case.slices(rank, tp), strict=True)):
        tensors, full = _made(fmt.name, n, k, 10 + i)
        if fmt.online is not None:
            tensors = {"weight": full.to(dtype)}
            full = full.to(dtype).float()
        _load(layer, shard, tensors)
        pieces.append(full[rows, cols])
    bias = None
    if case.bias:
        full_bias = _randn(case.parts[0][1], seed=99).to(dtype)
        layer.weight_loader(layer.bias, full_bias)
        if cols == ALL or rank == 0:  # a row-parallel layer without reduce adds it on rank 0 only
            bias = full_bias.float()[case.slices(rank, tp)[0][0]]
    assert layer.missing_shards() == []
    layer.process_weights_after_loading()
    weight = torch.cat(pieces)
    if fmt.online is not None:
        weight = fmt.online(weight)  # what quantizing this rank's weight gives
    return Built(layer, weight, bias, cols)


def _reference(fmt: Fmt, x: torch.Tensor, b: Built) -> torch.Tensor:
    x = x.float()
    if fmt.act_group is not None:  # the same per-token / per-group activation quantization
        x = fp8.dequantize_act(*fp8.quantize_act_reference(x, fmt.act_group), fmt.act_group)
    out = x @ b.weight.T
    return out if b.bias is None else out + b.bias


@pytest.mark.parametrize(("tp", "rank"), [(1, 0), (2, 0), (2, 1)])
@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("fmt", FORMATS)
def test_each_format_through_each_layer_matches_the_dequantized_reference(
    fmt: str, kind: str, tp: int, rank: int
) -> None:
    f, case = FORMATS[fmt], CASES[kind]
    b = _build(f, case, rank, tp)
    assert torch.equal(b.layer.method.dequantize(b.layer), b.weight)  # exactly this rank's slice
    x = _randn(7, case.parts[0][2], seed=5)[:, b.cols]
    out = b.layer(x)
    assert out.shape == (7, b.weight.shape[0]) and out.dtype == torch.float32
    assert rel_err(out, _reference(f, x, b)) < 1e-5


@pytest.mark.parametrize("fmt", ["fp8_online", "fp8_block_online", "mxfp4_online"])
def test_online_quantization_from_bfloat16_keeps_no_bfloat16_weight(fmt: str) -> None:
    f = FORMATS[fmt]
    b = _build(f, CASES["merged"], 0, 1, torch.bfloat16)
    assert "weight" not in dict(b.layer.named_parameters()) and not hasattr(b.layer, "weight")
    assert b.layer.qweight.dtype in (fp8.fp8_dtype(), torch.uint8)
    x = _randn(5, HIDDEN, seed=6).bfloat16()
    out = b.layer(x)
    assert out.dtype == torch.bfloat16 and rel_err(out, _reference(f, x, b)) < 1e-2
    plain = x.float() @ torch.cat([_randn(256, HIDDEN, seed=s).bfloat16().float() for s in (10, 11)]).T
    assert rel_err(out, plain) < (0.15 if "mxfp4" in fmt else 2**-3)  # quantized, not broken


def _param_bytes(layer: nn.Module) -> int:
    tensors = [*layer.parameters(), *layer.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# bytes per weight over bf16's two: fp8 one byte (+ per-row float32 scales: 4 bytes / 512 inputs), MXFP4
# 17/64, GGUF block bytes over 2 x block values
EXPECTED_RATIO = {
    "fp8_per_tensor": 0.5 + 2 / 512, "fp8_per_channel": 0.5 + 2 / 512, "fp8_online": 0.5 + 2 / 512,
    "fp8_block": 0.5 + 2 / 128**2, "fp8_block_online": 0.5 + 2 / 128**2, "mxfp4": 17 / 64,
    "mxfp4_online": 17 / 64,
    **{f"gguf_{t}": f.block_bytes / (2 * f.block) for t, f in gguf.FORMATS.items()},
}  # fmt: skip


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantized_layer_memory_against_bfloat16(fmt: str) -> None:
    f = FORMATS[fmt]
    with as_rank(0, 1):
        layer = ColumnParallelLinear(512, 512, bias=False, method=f.method(), dtype=torch.bfloat16)
    tensors, full = f.make(512, 512, 3)
    _load(layer, None, {"weight": full.bfloat16()} if f.online else tensors)
    layer.process_weights_after_loading()
    assert _param_bytes(layer) / (512 * 512 * 2) == pytest.approx(EXPECTED_RATIO[fmt], rel=1e-9)
    assert not any(t.is_floating_point() and t.numel() == 512 * 512 and t.element_size() > 1
                   for t in [*layer.parameters(), *layer.buffers()])  # fmt: skip


def _poison(x: torch.Tensor) -> torch.Tensor:
    bad = x.clone()
    bad[1], bad[4, 5] = float("nan"), 1e30
    return bad


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("fmt", FORMATS)
def test_poisoned_rows_leave_real_rows_bit_identical(fmt: str) -> None:
    layer = _build(FORMATS[fmt], CASES["qkv"], 0, 1).layer
    x = _randn(8, HIDDEN, seed=7)
    keep = [0, 2, 3, 5, 6, 7]
    clean, dirty = layer(x), layer(_poison(x))
    assert clean.isfinite().all() and torch.equal(dirty[keep], clean[keep])


class _Stack(nn.Module):
    def __init__(self, layers: list[LinearBase]) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([layer(x) for layer in self.layers], dim=-1)


@pytest.mark.parametrize("strategy", ["breakable", "compile"])
@torch.no_grad()
def test_padded_graph_replays_with_poisoned_padding(strategy: str) -> None:
    """The graph runtime's poison mode: every padded replay runs again with NaN in the padded rows and
    raises PaddingLeakError if a real row changes."""
    names = ["fp8_per_tensor", "fp8_block", "mxfp4", "gguf_Q4_K"]
    model = _Stack([_build(FORMATS[n], CASES["merged"], 0, 1).layer for n in names])
    config = GraphConfig(strategy=strategy, capture_sizes=[8], progress=False, poison_padding=True)
    runner = PiecewiseGraphRunner(model, config)
    runner.capture([_randn(8, HIDDEN, seed=8)])
    for n in (3, 5):
        x = _randn(n, HIDDEN, seed=n)
        padded = torch.cat([x, torch.zeros(8 - n, HIDDEN)])  # eager at the replayed size: same GEMM shapes
        assert torch.equal(runner(x), model(padded)[:n])
    assert runner.stats.as_dict()["replays"] == {"piecewise": {"8": 2}}


def test_rocm_converts_e4m3fn_checkpoints_to_fnuz(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    for fmt in ("fp8_per_tensor", "fp8_block"):
        b = _build(FORMATS[fmt], CASES["qkv"], 0, 1)
        assert b.layer.qweight.dtype == torch.float8_e4m3fnuz
        assert torch.equal(b.layer.method.dequantize(b.layer), b.weight)  # the same values
        x = _randn(4, HIDDEN, seed=9)
        assert rel_err(b.layer(x), _reference(FORMATS[fmt], x, b)) < 1e-5  # activations in fnuz too


# ---------------------------------------------------------------------------------------- alignment


def test_blocks_that_would_straddle_ranks_or_parts_fail_at_build() -> None:
    with as_rank(1, 2), pytest.raises(ValueError, match=r"192 output rows on this rank .* 128-row block"):
        ColumnParallelLinear(256, 384, method=Fp8LinearMethod("block", checkpoint=True))
    with pytest.raises(ValueError, match="fused part 1 holds 64 output rows"):  # k ends inside a block
        QKVParallelLinear(256, 64, 2, 1, method=Fp8LinearMethod("block", checkpoint=True))
    ReplicatedLinear(200, 200, method=Fp8LinearMethod("block", checkpoint=True))  # whole: tails are fine
    with as_rank(0, 2), pytest.raises(ValueError, match=r"48 input features on this rank .* 32-wide"):
        RowParallelLinear(96, 16, method=Mxfp4LinearMethod(checkpoint=True))
    with pytest.raises(ValueError, match="40 input features"):
        ReplicatedLinear(40, 16, method=Mxfp4LinearMethod())
    with as_rank(0, 4), pytest.raises(ValueError, match="GGUF Q4_K RowParallelLinear: 128 input features"):
        RowParallelLinear(512, 16, method=GGUFLinearMethod("Q4_K"))
    with pytest.raises(ValueError, match="no kernels"):
        GGUFLinearMethod("Q5_K")
    with pytest.raises(ValueError, match="unknown fp8 scheme"):
        Fp8LinearMethod("per_block")


def test_static_input_scales_load_and_activations_stay_dynamic() -> None:
    cfg = QuantConfig.from_hf({"quantization_config": AUTOFP8_STATIC})
    assert cfg is not None
    layer = QKVParallelLinear(HIDDEN, 128, 4, 2, method=cfg.method_for("model.layers.0.self_attn.qkv_proj"))
    pieces = []
    for i, (shard, n) in enumerate((("q", 512), ("k", 256), ("v", 256))):
        tensors, full = _fp8_ckpt("per_tensor")(n, HIDDEN, 10 + i)
        _load(layer, shard, {**tensors, "input_scale": torch.tensor(0.02)})
        pieces.append(full)
    assert layer.missing_shards() == []
    layer.process_weights_after_loading()
    assert not hasattr(layer, "input_scale")
    x = _randn(3, HIDDEN, seed=4)
    b = Built(layer, torch.cat(pieces), None, ALL)
    assert rel_err(layer(x), _reference(FORMATS["fp8_per_tensor"], x, b)) < 1e-5


# ---------------------------------------------------------------------------------------- QuantConfig

DEEPSEEK_V3 = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
AUTOFP8_STATIC = {"quant_method": "fp8", "activation_scheme": "static", "ignored_layers": ["lm_head"]}
GPT_OSS = {
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
                               "lm_head"],
}  # fmt: skip


def test_deepseek_v3_block_fp8() -> None:
    cfg = QuantConfig.from_hf({"model_type": "deepseek_v3", "quantization_config": DEEPSEEK_V3})
    assert cfg is not None and (cfg.method, cfg.scheme, cfg.checkpoint) == ("fp8", "block", True)
    for name in (
        "model.layers.3.mlp.gate_up_proj",
        "model.layers.0.self_attn.kv_b_proj",
        "model.layers.0.self_attn.fused_qkv_a_proj_with_mqa",
        "model.layers.3.mlp.shared_experts.down_proj",
    ):
        m = cfg.method_for(name)
        assert isinstance(m, Fp8LinearMethod) and m.scheme == "block" and m.checkpoint, name
    for name in ("model.layers.3.mlp.gate", "lm_head", "model.embed_tokens"):
        assert cfg.method_for(name) is None, name
    experts = cfg.experts_method_for("model.layers.3.mlp.experts")
    assert isinstance(experts, Fp8ExpertsMethod) and experts.scheme == "block" and experts.checkpoint


def test_per_tensor_static_fp8_checkpoint() -> None:
    cfg = QuantConfig.from_hf({"quantization_config": AUTOFP8_STATIC})
    assert cfg is not None and (cfg.scheme, cfg.static_input_scale) == ("per_tensor", True)
    m = cfg.method_for("model.layers.0.mlp.down_proj")
    assert isinstance(m, Fp8LinearMethod) and m.scheme == "per_tensor" and m.static_input_scale
    assert cfg.method_for("lm_head") is None


def test_gpt_oss_mxfp4_quantizes_only_the_experts() -> None:
    cfg = QuantConfig.from_hf({"quantization_config": GPT_OSS})
    assert cfg is not None and cfg.method == "mxfp4" and cfg.checkpoint
    for name in (
        "model.layers.0.self_attn.qkv_proj",
        "model.layers.7.self_attn.o_proj",
        "model.layers.0.mlp.router",
    ):
        assert cfg.method_for(name) is None
    experts = cfg.experts_method_for("model.layers.7.mlp.experts")
    assert isinstance(experts, Mxfp4ExpertsMethod) and experts.checkpoint


def test_ignored_layers_match_as_hf_does_and_fused_parts_must_agree() -> None:
    cfg = QuantConfig.from_hf({"quantization_config": {**DEEPSEEK_V3, "modules_to_not_convert": [
        "model.layers.1", "model.layers.2.self_attn.q_proj", "down_proj"]}})  # fmt: skip
    assert cfg is not None
    assert cfg.method_for("model.layers.1.mlp.gate_up_proj") is None
    assert cfg.method_for("model.layers.11.mlp.gate_up_proj") is not None  # "layers.1" stops at a boundary
    assert cfg.method_for("model.layers.5.mlp.down_proj") is None  # a dotted suffix
    with pytest.raises(ValueError, match="quantized unevenly"):
        cfg.method_for("model.layers.2.self_attn.qkv_proj")
    assert cfg.experts_method_for("model.layers.1.mlp.experts") is None


def test_online_names_and_resolution() -> None:
    assert set(ONLINE) == {"fp8", "fp8_block", "mxfp4"}
    fp8_cfg = QuantConfig.resolve({"model_type": "llama"}, "fp8")
    assert fp8_cfg is not None and (fp8_cfg.scheme, fp8_cfg.checkpoint) == ("per_channel", False)
    m = fp8_cfg.method_for("model.layers.0.self_attn.qkv_proj")
    assert isinstance(m, Fp8LinearMethod) and m.scheme == "per_channel" and not m.checkpoint
    assert isinstance(QuantConfig.from_flag("fp8_block").method_for("x.down_proj"), Fp8LinearMethod)
    mx = QuantConfig.from_flag("mxfp4")
    assert isinstance(mx.method_for("model.layers.0.mlp.down_proj"), Mxfp4LinearMethod)
    assert isinstance(mx.experts_method_for("model.layers.0.mlp.experts"), Mxfp4ExpertsMethod)
    assert mx.method_for("model.layers.0.mlp.gate") is None  # routers stay unquantized
    assert QuantConfig.resolve({"model_type": "llama"}) is None
    ckpt = {"quantization_config": DEEPSEEK_V3}
    assert QuantConfig.resolve(ckpt, "fp8") == QuantConfig.from_hf(ckpt)  # the checkpoint's scheme wins


@pytest.mark.parametrize(
    ("hf", "flag", "says"),
    [
        ({"quant_method": "awq", "bits": 4}, None, "'awq' is not supported: tessera loads quant_method"),
        ({"quant_method": "compressed-tensors"}, None, "'compressed-tensors' is not supported"),
        ({**DEEPSEEK_V3, "fmt": "e5m2"}, None, "format 'e5m2' is not supported: only e4m3"),
        ({**DEEPSEEK_V3, "weight_block_size": [64, 64]}, None, r"\[64, 64\] is not supported: only \[128"),
        ({**DEEPSEEK_V3, "activation_scheme": "per_tensor"}, None, "'dynamic' or 'static'"),
        ({**DEEPSEEK_V3, "expert_dtype": "fp4"}, None, "'fp4' experts are not supported"),
        (None, "int8", "'int8' is not supported: one of fp8, fp8_block, mxfp4"),
        (DEEPSEEK_V3, "mxfp4", "quantized as 'fp8'; --quantization 'mxfp4' cannot re-quantize it"),
    ],
)  # fmt: skip
def test_unsupported_configurations_say_what_is_supported(
    hf: dict | None, flag: str | None, says: str
) -> None:
    with pytest.raises(ValueError, match=says):
        QuantConfig.resolve({"quantization_config": hf} if hf else {}, flag)


def test_gguf_types_pick_a_method_per_layer() -> None:
    layer = "model.layers.0"
    types = {f"{layer}.self_attn.{p}.weight": t for p, t in
             (("q_proj", "Q4_K"), ("k_proj", "Q4_K"), ("v_proj", "Q6_K"), ("o_proj", "Q4_K"))}  # fmt: skip
    types |= {
        f"{layer}.mlp.gate_proj": "Q4_K",
        f"{layer}.mlp.up_proj": "Q4_K",
        f"{layer}.mlp.down_proj": "Q5_K",
    }
    types |= {"model.layers.1.mlp.down_proj": "F16", "lm_head": "Q6_K"}
    cfg = QuantConfig.from_gguf(types)
    assert cfg.method_for(f"{layer}.self_attn.qkv_proj") is None  # mixed types: built unquantized
    for name, t in (("self_attn.o_proj", "Q4_K"), ("mlp.gate_up_proj", "Q4_K")):
        m = cfg.method_for(f"{layer}.{name}")
        assert isinstance(m, GGUFLinearMethod) and m.ggml_type == t
    assert cfg.method_for(f"{layer}.mlp.down_proj") is None  # Q5_K: no kernels, dequantized
    assert cfg.method_for("model.layers.1.mlp.down_proj") is None  # F16
    assert cfg.method_for("lm_head") is None and cfg.experts_method_for("model.layers.0.mlp.experts") is None


@pytest.mark.parametrize(("embedding", "head"), [("Q8_0", None), ("Q4_K", "Q6_K"), ("F16", "Q5_K")])
def test_gguf_vocabulary_tables_keep_their_blocks_where_their_type_has_kernels(
    embedding: str, head: str | None
) -> None:
    """A head absent from the file (tied) and F16 or kernel-less types are plain rows; fp8 never
    touches the tables."""
    types = {"model.embed_tokens.weight": embedding} | ({"lm_head.weight": head} if head else {})
    cfg = QuantConfig.from_gguf(types)
    for name, t in (("model.embed_tokens", embedding), ("lm_head", head)):
        method = cfg(name)
        assert (method is None) == (t not in gguf.FORMATS), name
        assert method is None or (isinstance(method, GGUFVocabMethod) and method.ggml_type == t)
        assert cfg.keeps_gguf_blocks(f"{name}.weight") == (method is not None)
        assert cfg.method_for(name) is None  # no LinearMethod: the tables are no linear layers
    assert QuantConfig.from_flag("fp8")("model.embed_tokens") is None


# ---------------------------------------------------------------------------------------- experts

E, H, INTER = 4, 256, 128


def _routing(tokens: int, padded: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [T, H] (padded rows NaN), top-2 weights and ids (padded rows: id -1, weight 0)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, H, generator=gen)
    ids = torch.stack([torch.randperm(E, generator=gen)[:2] for _ in range(tokens)])
    weights = torch.rand(tokens, 2, generator=gen)
    x[tokens - padded :], ids[tokens - padded :], weights[tokens - padded :] = float("nan"), -1, 0
    return x, weights, ids


def _experts(method: ExpertsMethod, shape: ExpertShape, tensors: dict[str, torch.Tensor]) -> nn.Module:
    layer = nn.Module()
    layer.method = method  # as a MoE layer would hold it
    method.create_weights(layer, shape, torch.float32)
    for name, tensor in tensors.items():
        assert method.load(layer, name, tensor)
    method.process_weights_after_loading(layer)
    return layer


def _mxfp4_experts_ckpt(seed: int) -> tuple[Tensors, torch.Tensor, torch.Tensor]:
    """gpt-oss style blocks/scales of gate_up [E, 2I, H] and down [E, H, I], and their float32 values."""
    tensors, values = {}, []
    for name, shape in (("gate_up_proj", (E, 2 * INTER, H)), ("down_proj", (E, H, INTER))):
        blocks, scales = mxfp4.quantize(_randn(*shape, seed=seed))
        tensors[f"{name}_blocks"] = blocks.unflatten(-1, (-1, 16))
        tensors[f"{name}_scales"] = scales
        values.append(mxfp4.dequantize(blocks, scales))
    return tensors, values[0], values[1]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fmt", ["mxfp4", "mxfp4_online", "fp8_block", "fp8_per_tensor", "fp8_online"])
def test_expert_formats_match_the_unquantized_experts_on_their_dequantized_weights(
    fmt: str, dtype: torch.dtype
) -> None:
    shape = ExpertShape(E, H, INTER)
    if fmt == "mxfp4":
        tensors, w13, w2 = _mxfp4_experts_ckpt(seed=1)
        layer = _experts(Mxfp4ExpertsMethod(checkpoint=True), shape, tensors)
    elif fmt.endswith("online"):
        w13, w2 = _randn(E, 2 * INTER, H, seed=2), _randn(E, H, INTER, seed=3)
        method = Mxfp4ExpertsMethod() if fmt == "mxfp4_online" else Fp8ExpertsMethod("per_channel")
        layer = _experts(method, shape, {"gate_up_proj": w13, "down_proj": w2})
        w13, w2 = method.dequantize(layer)
    else:
        layer, w13, w2 = _fp8_experts_per_expert(fmt.removeprefix("fp8_"), shape)
    method = layer.method
    assert all(torch.equal(a, b) for a, b in zip(method.dequantize(layer), (w13, w2), strict=True))
    x, weights, ids = _routing(9, padded=2, seed=4)
    out = method.apply(layer, x.to(dtype), weights, ids)
    ref = moe_experts(x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)
    assert out.dtype == dtype and out[7:].eq(0).all()  # padded rows: skipped, zero
    assert rel_err(out[:7], ref[:7]) < (1e-5 if dtype == torch.float32 else 1e-2)
    clean_x = x.clone()
    clean_x[7:] = 0
    assert torch.equal(method.apply(layer, clean_x.to(dtype), weights, ids)[:7], out[:7])  # NaN went nowhere


def _fp8_experts_per_expert(scheme: str, shape: ExpertShape) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 / Mixtral-FP8 style: each expert's gate, up and down fp8 with its own scales."""
    method = Fp8ExpertsMethod(scheme, checkpoint=True)
    layer = nn.Module()
    method.create_weights(layer, shape, torch.float32)
    layer.method = method
    suffix = "_scale_inv" if scheme == "block" else "_scale"
    w13, w2 = torch.zeros(E, 2 * INTER, H), torch.zeros(E, H, INTER)
    for e in range(E):
        for proj, part, (n, k) in (("gate_up_proj", 0, (INTER, H)), ("gate_up_proj", 1, (INTER, H)),
                                   ("down_proj", None, (H, INTER))):  # fmt: skip
            q, s = fp8.quantize_weight(_randn(n, k, seed=100 + e * 3 + (part or 2)) * (e + 1), scheme, FN)
            assert method.load(layer, proj, q, e, part) and method.load(layer, proj + suffix, s, e, part)
            values = fp8.dequantize_weight(q, s, scheme)
            if part is None:
                w2[e] = values
            else:
                w13[e, part * INTER : (part + 1) * INTER] = values
    method.process_weights_after_loading(layer)
    return layer, w13, w2


def test_expert_slices_for_tensor_and_expert_parallel_ranks() -> None:
    tensors, w13, w2 = _mxfp4_experts_ckpt(seed=5)
    for rank in range(2):
        with as_rank(rank, 2):
            shape = ExpertShape.for_rank(E, H, INTER)  # TP without EP: I split
        assert (shape.intermediate_size, shape.intermediate_start) == (64, 64 * rank)
        layer = _experts(Mxfp4ExpertsMethod(checkpoint=True), shape, tensors)
        got13, got2 = layer.method.dequantize(layer)
        cut = slice(64 * rank, 64 * (rank + 1))
        assert torch.equal(got13, torch.cat([w13[:, :INTER][:, cut], w13[:, INTER:][:, cut]], 1))
        assert torch.equal(got2, w2[..., cut])
    ep = ExpertShape(2, H, INTER, first_expert=2)  # rank 1 of 2 with EP: experts 2 and 3
    layer = _experts(Mxfp4ExpertsMethod(checkpoint=True), ep, tensors)
    assert torch.equal(layer.method.dequantize(layer)[0], w13[2:])
    method, fresh = Mxfp4ExpertsMethod(checkpoint=True), nn.Module()
    method.create_weights(fresh, ep, torch.float32)
    assert not method.load(fresh, "down_proj_blocks", tensors["down_proj_blocks"][0], expert=0)  # not ours


def test_expert_blocks_must_not_straddle_gate_and_up_or_ranks() -> None:
    with pytest.raises(ValueError, match="intermediate size 48 on this rank is not a multiple of the 32"):
        Mxfp4ExpertsMethod().create_weights(nn.Module(), ExpertShape(2, 64, 48), torch.float32)
    with pytest.raises(ValueError, match=r"intermediate size 192 .* 128-wide"):
        Fp8ExpertsMethod("block", checkpoint=True).create_weights(
            nn.Module(), ExpertShape(2, 256, 192), torch.float32
        )
    assert Fp8ExpertsMethod.capture_safe is False and Mxfp4ExpertsMethod.capture_safe


def test_expert_memory_stays_quantized() -> None:
    layer, _, _ = _fp8_experts_per_expert("block", ExpertShape(E, H, INTER))
    assert not list(layer.parameters())
    values = E * 3 * INTER * H
    scales = E * (2 * INTER // 128 * H // 128 + H // 128 * INTER // 128)
    assert _param_bytes(layer) == values + 4 * scales  # one byte a value, a float32 per 128x128 block
    assert layer.w13.dtype == fp8.fp8_dtype() and layer.w2.element_size() == 1
    mx = _experts(Mxfp4ExpertsMethod(checkpoint=True), ExpertShape(E, H, INTER), _mxfp4_experts_ckpt(6)[0])
    assert _param_bytes(mx) == values * 17 // 32  # 4.25 bits a value


def test_fp8_experts_op_fake_tensor() -> None:
    layer, _, _ = _fp8_experts_per_expert("block", ExpertShape(E, H, INTER))
    x, weights, ids = _routing(5, padded=0, seed=7)
    args = (x, layer.w13, layer.w13_scale, layer.w2, layer.w2_scale, weights, ids, "block")
    torch.library.opcheck(torch.ops.tessera.fp8_moe_experts.default, args, test_utils=("test_faketensor",))


class _Lazy:
    """A checkpoint tensor not read yet (`tessera.layers.linear.LazyTensor`): shape, narrow, materialize."""

    def __init__(self, t: torch.Tensor) -> None:
        self._t, self.shape = t, t.shape

    def narrow(self, dim: int, start: int, length: int) -> _Lazy:
        return _Lazy(self._t.narrow(dim, start, length))

    def materialize(self) -> torch.Tensor:
        return self._t.clone()


def test_expert_loading_reads_lazy_tensors() -> None:
    tensors = _mxfp4_experts_ckpt(seed=8)[0]
    shape = ExpertShape(E, H, INTER // 2, intermediate_start=INTER // 2)  # rank 1 of 2
    lazy = _experts(Mxfp4ExpertsMethod(checkpoint=True), shape, {n: _Lazy(t) for n, t in tensors.items()})
    eager = _experts(Mxfp4ExpertsMethod(checkpoint=True), shape, tensors)
    for a, b in zip(lazy.method.dequantize(lazy), eager.method.dequantize(eager), strict=True):
        assert torch.equal(a, b)
    method, layer = Fp8ExpertsMethod("per_tensor", checkpoint=True), nn.Module()
    method.create_weights(layer, ExpertShape(1, 128, 128), torch.float32)
    assert method.load(layer, "gate_up_proj_scale", _Lazy(torch.tensor(0.5)), expert=0, part=1)
    assert layer.gate_up_proj_scale[0, 128:].eq(0.5).all()  # a per-tensor scalar fills its part's rows
