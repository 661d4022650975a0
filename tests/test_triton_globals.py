"""Every Triton kernel reads only globals a GPU compile accepts: functions, modules and `tl.constexpr`
values. The interpreter CI runs the kernels in accepts a plain int too, which then fails to compile on a
GPU (found there: an MXFP4 kernel read `GROUP = 32`)."""

from __future__ import annotations

import importlib
import types

import pytest

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

MODULES = [
    "tessera.layers.fused",
    "tessera.layers.fused_moe",
    "tessera.layers.gemv",
    "tessera.layers.triton_attention",
    "tessera.quant.fp8_kernels",
    "tessera.quant.gemv_kernels",
    "tessera.quant.gguf_kernels",
    "tessera.quant.mxfp4_kernels",
]


def _kernels(module: types.ModuleType) -> list[types.FunctionType]:
    """The Python functions of the module's kernels and jit helpers (JIT, interpreted or autotuned)."""
    out = []
    for value in vars(module).values():
        if isinstance(value, triton.runtime.jit.KernelInterface):
            while not isinstance(value, types.FunctionType):
                value = value.fn
            out.append(value)
    return out


@pytest.mark.parametrize("name", MODULES)
def test_kernels_read_only_constexpr_globals(name: str) -> None:
    module = importlib.import_module(name)
    kernels = _kernels(module)
    assert kernels, f"{name} defines no Triton kernel"
    for kernel in kernels:
        for used in kernel.__code__.co_names:
            value = vars(module).get(used)
            bad = isinstance(value, int | float | bool) and not isinstance(value, tl.constexpr)
            assert not bad, f"{name}.{kernel.__name__} reads the plain global {used} = {value!r}"
