"""Where the host time of one engine step goes (GPU): a SmolLM2-shaped model with random weights, an
EXTEND of 16 tokens, the attention split op taken apart. Prints microseconds per call.

python -m benchmarks.profile_engine
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from benchmarks.common import CONFIGS, host_us, time_once
from benchmarks.step import make_batch, page_manager
from tessera.engine.config import EngineConfig
from tessera.engine.model_runner import ModelRunner
from tessera.graphs import ForwardContext, forward_context
from tessera.layers import attention as attn
from tessera.layers import triton_attention
from tessera.layers.kernel_launch import KernelLauncher
from tessera.layers.triton_attention import paged_attention
from tessera.loader import model_loader
from tessera.testing.toy import toy_attention
from tessera.testing.toy_attention import causal_attention

FOLDER = CONFIGS / "smollm2-135m"


@triton.jit
def _noop(x, n):
    pass


def _binary_rows(launch: KernelLauncher, attend: Callable[[], None]) -> list[tuple[str, float]]:
    """The attention launch's compiled binary called alone: with tensors (Triton's launcher calls
    data_ptr() and validates each pointer with the driver) and with their addresses (what
    KernelLauncher passes)."""
    calls: list[tuple[tuple[int, ...], tuple[object, ...], dict[str, int]]] = []

    class Recorder:
        direct_launches = 0

        def keyed(self, key: object, grid: tuple[int, ...], args: tuple, flat: tuple, **opts: int) -> None:
            calls.append((grid, args, opts))

    triton_attention._launch_attention = Recorder()  # type: ignore[assignment]
    try:
        attend()
    finally:
        triton_attention._launch_attention = launch
    grid, args, opts = calls[0]
    binary = launch.fn[grid](**dict(zip(launch.fn.arg_names, args, strict=True)), **opts)  # cached
    run = binary[(*grid, 1, 1)[:3]]
    flat = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args]
    return [
        ("    its binary, tensors passed", host_us(lambda: run(*args))),
        ("    its binary, addresses passed", host_us(lambda: run(*flat))),
    ]


def _toy_rows(q: torch.Tensor) -> list[tuple[str, float]]:
    """The toy stack's attention split op (`benchmarks.graphs`) on the same 16 tokens."""
    k, v, out = torch.randn_like(q), torch.randn_like(q), torch.empty_like(q)
    n = q.shape[0]
    with forward_context(ForwardContext(n, n)):
        body = host_us(lambda: toy_attention.fn(q, k, v, out, 0))
    alone = host_us(lambda: causal_attention(q, k, v, out, n))
    return [("toy attention body (bench graphs)", body), ("  its Triton launch alone", alone)]


def main() -> None:
    model = model_loader.dummy_model(FOLDER, torch.bfloat16, torch.device("cuda"))
    cfg = model.config
    rows: list[tuple[str, float]] = []
    runner = ModelRunner(model, EngineConfig.create(extend_cuda_graph_max_tokens=0), num_pages=512)
    batch = make_batch(runner, "extend", 16, 1, kv=page_manager(runner))
    step = lambda _: runner.forward(batch)  # noqa: E731
    for _ in range(3):
        step(None)
    rows.append(("step, wall (ms, GPU events)", time_once(step, batch.input_ids, 20)))
    rows.append(("step, host only (us)", host_us(lambda: runner.forward(batch), 5)))
    layer = runner.layers[(0, "attn")]
    meta = batch.metadata
    q = torch.randn(16, cfg.num_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16)
    k, v = (
        torch.randn(16, cfg.num_kv_heads, cfg.head_dim, device="cuda", dtype=torch.bfloat16) for _ in "kv"
    )
    out = torch.empty_like(q)
    kl = meta.kernel
    with forward_context(ForwardContext(16, 16, meta, runner.layers)):
        op, fn = torch.ops.tessera.attention, attn.attention.fn
        rows.append(("torch.ops.tessera.attention (eager path)", host_us(lambda: op(q, k, v, out, 0))))
        rows.append(("  its Python body", host_us(lambda: fn(q, k, v, out, 0))))
        bound = attn.attention.bound(q, k, v, out, 0)
        rows.append(("  bound to its buffers (what a replay calls)", host_us(bound)))
        launch = triton_attention._launch_attention

        def attend() -> None:
            paged_attention(q, layer.k_cache, layer.v_cache, out, kl.page_table, kl.q_start, kl.q_len,
                            kl.ctx_len, kl.max_q_len, layer.page_size, layer.scale,
                            new_kv=(k, v, meta.slot_mapping))  # fmt: skip

        rows.append(("  paged_attention, the compiled binary called", host_us(attend)))
        launch.direct = False
        rows.append(("  paged_attention through triton.jit's dispatch", host_us(attend)))
        launch.direct = True
        rows += _binary_rows(launch, attend)
        x = torch.zeros(16, device="cuda")
        rows.append(("a Triton launch of an empty 2-arg kernel", host_us(lambda: _noop[(1,)](x, 16))))
        rows.append(("a torch add_", host_us(lambda: x.add_(1))))
        rows += _toy_rows(q)
        graphs = runner.graphs
        assert graphs is not None and graphs.strategy is not None
        calls = graphs.strategy._graphs[16].calls  # [segment, attention, segment, ..., segment]
        segments = calls[::2]
        rows.append(
            (f"replay: {len(calls)} segments + eager steps", host_us(lambda: [c() for c in calls], 5))
        )
        rows.append(
            (f"  the {len(segments)} graph segments alone", host_us(lambda: [c() for c in segments], 20))
        )
    gpu = torch.cuda.get_device_name()
    print(f"\nhost time on {gpu}, torch {torch.__version__}, triton {triton.__version__}")
    for name, us in rows:
        print(f"{name:<48}{us:>10.1f}")


if __name__ == "__main__":
    main()
