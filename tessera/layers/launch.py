"""Host-side arithmetic for kernel launches, in plain Python.

NOTE: `triton.cdiv` and `triton.next_power_of_2` are constexpr functions: called from the host they go
through Triton's wrapper, ~3 µs a call on a fast CPU. An eager split op launches a kernel on every layer
of every step, so its launch arithmetic stays in plain integers.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
