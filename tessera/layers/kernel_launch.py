"""Host-side launch helpers for Triton kernels that run eagerly on every layer of every step.

NOTE: an eager split op (attention) sits between graph replays, so its host time is time the GPU waits
for. Three costs dominate it and all are avoidable:
- `triton.cdiv` / `triton.next_power_of_2` are constexpr functions: called from the host they go through
  Triton's wrapper, ~3 µs a call. Launch arithmetic stays in plain integers here.
- `kernel[grid](...)` re-derives the kernel's specialization from every argument and looks the compiled
  binary up on every call: ~20 µs for an empty kernel, ~40 µs for attention's 37 arguments on an H200
  host. `KernelLauncher` keys its own cache on what Triton specializes on and calls the compiled binary
  directly after the first launch, with tensors as their addresses (the binary's launcher would call
  `data_ptr()` and a driver query on each: ~0.5 µs of a ~9 µs binary call on an H200 host).
- Building that key in a generic pass over every argument is itself ~9 µs for attention's 37 on the CI
  host; a caller that knows its arguments (which are strides, which pointers are alignment-specialized)
  builds the key in a few tuple operations and launches through `KernelLauncher.keyed`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Hashable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

_I32 = range(-(2**31), 2**31)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1


def _int_spec(arg: int) -> tuple[bool, bool, bool]:
    """What Triton specializes an integer argument on: being 1, divisible by 16, 32-bit."""
    return arg == 1, arg % 16 == 0, arg in _I32


def tensors_spec(tensors: Sequence[torch.Tensor], ptrs: Sequence[int]) -> tuple:
    """What Triton specializes a launch's tensor arguments on (their device, dtypes, and the 16-byte
    alignment of their addresses `ptrs`), for a key a caller builds for `KernelLauncher.keyed`."""
    return tensors[0].get_device(), tuple([t.dtype for t in tensors]), tuple([p % 16 == 0 for p in ptrs])


class KernelLauncher:
    """Launches a `@triton.jit` kernel with every parameter positional, in declaration order
    (constexprs included) plus launch options (`num_warps`, ...). The first launch of each
    specialization goes through Triton (compiling if needed); later ones call the compiled binary.

    Under TRITON_INTERPRET=1 (CPU tests) there is no binary: every launch goes through Triton."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        # constexprs key by value; runtime arguments by what Triton specializes them on
        self._names = tuple(fn.arg_names)
        constexprs = set(getattr(fn, "constexprs", ()))  # indices (an interpreted function has none)
        self._const = tuple(i in constexprs for i in range(len(self._names)))
        self._fn_name = getattr(fn, "__name__", "kernel")
        self._binaries: dict[tuple, Any] = {}
        self.direct = os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true")
        self.direct_launches = 0  # launches that skipped Triton's dispatch (checked by the GPU tests)

    def __call__(self, grid: tuple[int, ...], args: Sequence[object], **options: int) -> None:
        if len(args) != len(self._const):
            raise TypeError(f"{self._fn_name}: {len(self._const)} arguments expected, got {len(args)}")
        if not self.direct:
            self._through_triton(grid, args, options)
            return
        spec: list[object] = []
        flat = list(args)
        device = None
        for i, (a, const) in enumerate(zip(args, self._const, strict=True)):
            if const:
                spec.append(a)
            elif isinstance(a, torch.Tensor):
                ptr = flat[i] = a.data_ptr()
                if device is None:  # a launch's tensors share one device (Triton checks on compile)
                    device = a.get_device()
                spec.append((a.dtype, ptr % 16 == 0))
            elif type(a) is int:
                spec.append(_int_spec(a))
            else:
                spec.append(type(a))
        self.keyed((device, tuple(spec)), grid, args, flat, **options)

    def keyed(
        self,
        key: Hashable,
        grid: tuple[int, ...],
        args: Sequence[object],
        flat: Sequence[object],
        **options: int,
    ) -> None:
        """A launch whose caller derived the cache key itself, cheaper than `__call__`'s pass over every
        argument (knowing which are strides, which pointers Triton checks the alignment of, ...). `key`
        must determine everything Triton specializes on — each tensor's dtype and device, the 16-byte
        alignment of the pointers not excluded from it, integers' values (or their being 1, divisible by
        16, 32-bit), constexpr values — or a launch may run another specialization's binary. `flat` is
        `args` with every tensor replaced by its address (what the binary gets: Triton's launcher would
        call data_ptr() and query the driver about each pointer again)."""
        if not self.direct:
            self._through_triton(grid, args, options)
            return
        key = (key, tuple(options.items()))
        binary = self._binaries.get(key)
        if binary is None:
            self._binaries[key] = self._through_triton(grid, args, options)
            return
        try:
            binary[(*grid, 1, 1)[:3]](*flat)
        except (TypeError, AttributeError) as e:  # a Triton whose compiled-kernel API differs
            log.warning("direct Triton launches disabled (%s); launching through triton.jit", e)
            self.direct = False
            self._through_triton(grid, args, options)
            return
        self.direct_launches += 1

    def compiled(self, key: Hashable, **options: int) -> Any | None:
        """The binary `keyed` launches for this key and these options once it has one (None before,
        and without direct launches): a caller that launches the same specialization again and again
        may keep it and call `binary[grid](*flat)` itself, after a `keyed` launch went direct."""
        return self._binaries.get((key, tuple(options.items()))) if self.direct else None

    def _through_triton(self, grid: tuple[int, ...], args: Sequence[object], options: dict[str, int]) -> Any:
        binary = self.fn[grid](**dict(zip(self._names, args, strict=True)), **options)
        return binary.result() if hasattr(binary, "result") else binary  # an async compile's future
