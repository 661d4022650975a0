"""KernelLauncher's cache of compiled binaries, with a stand-in for a `@triton.jit` function: a launch
goes through Triton exactly when Triton could pick another binary, and straight to the binary otherwise
(tensors passed as their addresses)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from tessera.layers.launch import KernelLauncher


@dataclass
class _FakeJit:
    """Records launches through "Triton" (`fn[grid](**kwargs)`) and through its binaries."""

    arg_names: list[str]
    constexprs: list[int]  # indices, as on triton's JITFunction
    compiled: list[dict] = field(default_factory=list)
    direct: list[tuple] = field(default_factory=list)

    def __getitem__(self, grid):
        def run(**kwargs):
            self.compiled.append(kwargs)
            return _FakeBinary(self, len(self.compiled))

        return run


@dataclass
class _FakeBinary:
    jit: _FakeJit
    ident: int

    def __getitem__(self, grid):
        assert len(grid) == 3, "a compiled kernel's runner reads grid[0..2]"
        return lambda *args: self.jit.direct.append((self.ident, grid, args))


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> tuple[_FakeJit, KernelLauncher]:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    jit = _FakeJit(["X", "n", "scale", "BLOCK"], [3])
    return jit, KernelLauncher(jit)


def test_first_launch_compiles_then_the_binary_is_called(fake) -> None:
    jit, launch = fake
    x = torch.zeros(64)
    launch((4,), (x, 32, 0.5, 16), num_warps=4)
    assert jit.compiled == [{"X": x, "n": 32, "scale": 0.5, "BLOCK": 16, "num_warps": 4}]
    launch((2, 3), (x, 64, 0.25, 16), num_warps=4)  # same specialization: n % 16 == 0, float scale
    assert len(jit.compiled) == 1 and launch.direct_launches == 1
    # the binary gets the tensor as its address: Triton's launcher would look it up and validate it
    assert jit.direct == [(1, (2, 3, 1), (x.data_ptr(), 64, 0.25, 16))]


@pytest.mark.parametrize(
    "args, options",
    [
        ((None, 33, 0.5, 16), {"num_warps": 4}),  # an integer no longer divisible by 16
        ((None, 1, 0.5, 16), {"num_warps": 4}),  # an integer equal to 1 (Triton makes it a constant)
        ((None, 2**33, 0.5, 16), {"num_warps": 4}),  # a 64-bit integer
        ((None, 32, 0.5, 32), {"num_warps": 4}),  # another constexpr value
        ((None, 32, 0.5, 16), {"num_warps": 8}),  # other launch options
        ((None, 32, 1, 16), {"num_warps": 4}),  # an int where a float was
        (("half", 32, 0.5, 16), {"num_warps": 4}),  # another dtype
        (("misaligned", 32, 0.5, 16), {"num_warps": 4}),  # a pointer off a 16-byte boundary
    ],
)
def test_a_new_specialization_goes_through_triton(fake, args: tuple, options: dict) -> None:
    jit, launch = fake
    base = torch.zeros(64)
    launch((1,), (base, 32, 0.5, 16), num_warps=4)
    x = {None: base, "half": base.half(), "misaligned": base[1:]}[args[0]]
    launch((1,), (x, *args[1:]), **options)
    assert len(jit.compiled) == 2 and launch.direct_launches == 0
    launch((1,), (x, *args[1:]), **options)  # and is direct from then on
    assert len(jit.compiled) == 2 and launch.direct_launches == 1


def test_interpreter_always_goes_through_triton(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    jit, _ = fake
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launch = KernelLauncher(jit)
    for _ in range(3):
        launch((1,), (torch.zeros(4), 32, 0.5, 16))
    assert len(jit.compiled) == 3 and launch.direct_launches == 0


def test_wrong_argument_count_is_an_error(fake) -> None:
    _, launch = fake
    with pytest.raises(TypeError, match="4 arguments expected, got 3"):
        launch((1,), (torch.zeros(4), 32, 0.5))
