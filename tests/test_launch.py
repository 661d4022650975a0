"""KernelLauncher's cache of compiled binaries, with a stand-in for a `@triton.jit` function: a launch
goes through Triton exactly when Triton could pick another binary, and straight to the binary otherwise
(tensors passed as their addresses)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import pytest
import torch

from tessera.layers.kernel_launch import KernelLauncher


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


def test_a_caller_key_decides_between_triton_and_the_binary(fake) -> None:
    jit, launch = fake
    x = torch.zeros(64)
    flat = (x.data_ptr(), 32, 0.5, 16)
    launch.keyed("k1", (1,), (x, 32, 0.5, 16), flat, num_warps=4)
    launch.keyed("k1", (1,), (x, 32, 0.5, 16), flat, num_warps=4)
    assert len(jit.compiled) == 1 and jit.direct == [(1, (1, 1, 1), flat)]
    launch.keyed("k2", (1,), (x, 32, 0.5, 16), flat, num_warps=4)  # another key: through Triton
    launch.keyed("k1", (1,), (x, 32, 0.5, 16), flat, num_warps=8)  # other launch options too
    assert len(jit.compiled) == 3 and launch.direct_launches == 1


def test_paged_attention_keys_every_specialization(monkeypatch: pytest.MonkeyPatch) -> None:
    """The attention launch's own key: the same layout goes straight to the binary; a pointer whose
    16-byte alignment changed, other strides or another dtype go through Triton first."""
    ta = pytest.importorskip("tessera.layers.triton_attention")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = ta._paged_attention_kernel
    params = inspect.signature(kernel.fn).parameters.values()  # interpreted or not: annotations tell
    constexprs = [i for i, p in enumerate(params) if "constexpr" in str(p.annotation)]
    jit = _FakeJit(list(kernel.arg_names), constexprs)
    launch = KernelLauncher(jit)
    monkeypatch.setattr(ta, "_launch_attention", launch)
    heads, kv_heads, dim, page = 4, 2, 16, 16

    def attend(q: torch.Tensor, k_cache: torch.Tensor) -> None:
        out, k = torch.empty_like(q), torch.zeros(q.shape[0], kv_heads, dim, dtype=q.dtype)
        lens, zero = torch.full((1,), q.shape[0], dtype=torch.int32), torch.zeros(1, dtype=torch.int32)
        table, slots = torch.zeros(1, 2, dtype=torch.int32), torch.zeros(q.shape[0], dtype=torch.int64)
        ta.paged_attention(q, k_cache, k_cache, out, table, zero, lens, lens, q.shape[0], page, 0.5,
                           new_kv=(k, k, slots))  # fmt: skip

    cache = torch.zeros(64, kv_heads, dim)
    q = torch.zeros(5, heads, dim)
    attend(q, cache)
    attend(torch.zeros(5, heads, dim), cache)  # other tensors, same specialization
    assert len(jit.compiled) == 1 and launch.direct_launches == 1
    assert all(type(a) is not torch.Tensor for a in jit.direct[0][2]), "tensors reach the binary as addresses"
    for other_q, other_cache in (
        (torch.zeros(6 * heads * dim + 1)[1:].view(6, heads, dim), cache),  # q off a 16-byte boundary
        (torch.zeros(5, 2 * heads, dim)[:, :heads], cache),  # other strides
        (q.half(), cache.half()),  # another dtype
    ):
        compiled = len(jit.compiled)
        attend(other_q, other_cache)
        assert len(jit.compiled) == compiled + 1


def test_a_bound_attention_keeps_its_binary_for_the_same_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    """PagedAttention launches a plan key it launched directly before straight through the kept binary
    (the launcher's lookup skipped), with this batch's addresses; another plan goes through the
    launcher again."""
    ta = pytest.importorskip("tessera.layers.triton_attention")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    kernel = ta._paged_attention_kernel
    params = inspect.signature(kernel.fn).parameters.values()
    jit = _FakeJit(
        list(kernel.arg_names), [i for i, p in enumerate(params) if "constexpr" in str(p.annotation)]
    )
    launch = KernelLauncher(jit)
    monkeypatch.setattr(ta, "_launch_attention", launch)
    q, out, cache = torch.zeros(5, 4, 16), torch.zeros(5, 4, 16), torch.zeros(64, 2, 16)
    bound = ta.PagedAttention(q, cache, cache, out, 16, 0.5)

    def plan(q_len: int) -> object:
        lens, table = torch.full((1,), q_len, dtype=torch.int32), torch.zeros(1, 2, dtype=torch.int32)
        return bound.plan(table, torch.zeros(1, dtype=torch.int32), lens, lens, q_len)

    for _ in range(2):  # through Triton, then direct through the launcher
        bound.launch(plan(5))
    assert len(jit.compiled) == 1 and launch.direct_launches == 1
    batch = plan(5)  # a new batch of the same shape: its (interned) plan key is the one kept
    bound.launch(batch, (3, 5))
    assert launch.direct_launches == 1 and len(jit.direct) == 2, "the kept binary, not the launcher"
    names = list(kernel.arg_names)
    args = jit.direct[-1][2]
    assert args[names.index("q_len")] == batch.tensors[3].data_ptr()  # this batch's layout
    assert (args[names.index("zero_from")], args[names.index("zero_to")]) == (3, 5)
    bound.launch(plan(80))  # past SMALL_BLOCK_MAX_Q: other block shapes, another binary
    assert len(jit.compiled) == 2
