"""Where the host time of a piecewise step and of start-up goes (GPU). Prints a table of microseconds.

python -m benchmarks.profile_graphs
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import host_us
from benchmarks.graphs import SMOLLM2_SHAPED
from tessera.graphs import ForwardContext, GraphConfig, PiecewiseGraphRunner, forward_context
from tessera.graphs.platform import CudaGraphBackend
from tessera.testing.toy import ToyModel


def main() -> None:
    torch.manual_seed(0)
    cfg = SMOLLM2_SHAPED
    h, d = cfg.num_heads, cfg.head_dim
    rows: list[tuple[str, float]] = []
    q, k, v = (torch.randn(4, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = torch.empty_like(q)

    g = torch.cuda.CUDAGraph()
    x = torch.randn(16, device="cuda")
    with torch.cuda.graph(g):
        x.add_(1)
    rows.append(("replay of a 1-kernel graph", host_us(g.replay)))

    def sdpa() -> None:
        o = F.scaled_dot_product_attention(
            q[:1].transpose(0, 1), k[:1].transpose(0, 1), v[:1].transpose(0, 1), is_causal=True
        )
        out[:1].copy_(o.transpose(0, 1))

    rows.append(("toy attention via F.sdpa (N=1)", host_us(sdpa)))

    def flash() -> None:
        o = torch.ops.aten._flash_attention_forward(
            q[:1].unsqueeze(0),
            k[:1].unsqueeze(0),
            v[:1].unsqueeze(0),
            None,
            None,
            1,
            1,
            0.0,
            True,
            False,
        )[0]
        out[:1].copy_(o[0])

    rows.append(("attention via aten._flash_attention_forward", host_us(flash)))
    rows.append(("a copy_ alone", host_us(lambda: out[:1].copy_(q[:1]))))
    rows.append(("a zero_ of a slice", host_us(lambda: out[1:4].zero_())))

    model = ToyModel(cfg).cuda().to(torch.bfloat16).eval()
    ids = torch.randint(0, cfg.vocab_size, (16,), device="cuda")
    with torch.no_grad():
        runner = PiecewiseGraphRunner(model, GraphConfig(capture_sizes=[16], progress=False))
        runner.capture([ids])
        strategy = runner.strategy
        assert strategy is not None
        rows.append(("runner step (breakable, N=16)", host_us(lambda: runner(ids), 10)))
        with forward_context(ForwardContext(16, 16)):
            rows.append(("strategy.replay alone", host_us(lambda: strategy.replay(16, ()), 10)))
        graph = strategy._graphs[16]
        rows.append(("  of which graph segments", len(graph.calls) and 0.0))

        # start-up: split one size's capture into its parts
        backend = runner.backend
        assert isinstance(backend, CudaGraphBackend)
        times = {"capture_begin": 0.0, "capture_end": 0.0}
        begin, end = backend.begin, backend.end

        def timed_begin() -> None:
            t = time.perf_counter()
            begin()
            times["capture_begin"] += time.perf_counter() - t

        def timed_end() -> Any:
            t = time.perf_counter()
            r = end()
            times["capture_end"] += time.perf_counter() - t
            return r

        backend.begin, backend.end = timed_begin, timed_end  # type: ignore[method-assign]
        view = (ids,)
        with forward_context(ForwardContext(16, 16)):
            t = time.perf_counter()
            model(ids)
            warm = time.perf_counter() - t
            t = time.perf_counter()
            strategy.capture(16, view)
            total = time.perf_counter() - t
        rows.append(("start-up: eager warm-up forward (ms)", warm * 1e3))
        rows.append(("start-up: one size's capture (ms)", total * 1e3))
        rows.append(("  in capture_begin (ms)", times["capture_begin"] * 1e3))
        rows.append(("  in capture_end = instantiate (ms)", times["capture_end"] * 1e3))
    print(f"\nhost time on {torch.cuda.get_device_name()}")
    for name, us in rows:
        print(f"{name:<48}{us:>10.1f}")


if __name__ == "__main__":
    main()
