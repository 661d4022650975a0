"""Piecewise graphs on a real GPU: replay equals eager, the pool is shared, the watchdog fires."""

from __future__ import annotations

import threading

import pytest
import torch

from tessera.graphs import CaptureError, GraphConfig, PiecewiseGraphRunner
from tessera.testing.toy import ToyConfig, ToyModel

from .conftest import rel_err
from .graph_models import SumsAllRows

pytestmark = pytest.mark.gpu

CFG = ToyConfig(vocab_size=1000, hidden_size=256, num_heads=4, intermediate_size=512, num_layers=3)


def _model() -> ToyModel:
    torch.manual_seed(0)
    return ToyModel(CFG).cuda().to(torch.bfloat16).eval()


def _ids(n: int) -> torch.Tensor:
    return torch.randint(0, CFG.vocab_size, (n,), device="cuda")


@pytest.mark.parametrize(
    ("strategy", "compiler"), [("breakable", "eager"), ("compile", "eager"), ("compile", "inductor")]
)
@torch.no_grad()
def test_replay_equals_eager_at_every_size(strategy: str, compiler: str) -> None:
    model = _model()
    cfg = GraphConfig(strategy=strategy, compiler=compiler, max_tokens=512, progress=False)
    runner = PiecewiseGraphRunner(model, cfg)
    runner.capture([_ids(7)])
    assert runner.report is not None and runner.report.num_pieces == CFG.num_layers + 1
    sizes = set(runner.sizes) | {s - 1 for s in runner.sizes if s > 1} | {1, 2, 3, 13, 100, 333, 511}
    for n in sorted(sizes):
        ids = _ids(n)
        out = runner(ids).clone()
        ref = model(ids)
        assert out.shape == ref.shape
        # NOTE: bf16; a padded GEMM may pick another kernel than the unpadded eager one.
        assert rel_err(out, ref) < 2e-2, (n, rel_err(out, ref))
    assert sum(runner.stats.replays.values()) == len(sizes)
    assert not runner.stats.fallbacks


@pytest.mark.parametrize("strategy", ["breakable", "compile"])
@torch.no_grad()
def test_poison_mode_passes_on_the_toy(strategy: str) -> None:
    runner = PiecewiseGraphRunner(
        _model(), GraphConfig(strategy=strategy, capture_sizes=[16, 64], poison_padding=True, progress=False)
    )
    runner.capture([_ids(5)])
    for n in (1, 9, 50):
        runner(_ids(n))
    assert runner.stats.sizes("piecewise") == {16: 2, 64: 1}


@pytest.mark.parametrize("strategy", ["breakable", "compile"])
@torch.no_grad()
def test_pool_is_shared_across_sizes(strategy: str) -> None:
    def graph_memory(sizes: list[int]) -> int:
        torch.cuda.empty_cache()
        runner = PiecewiseGraphRunner(
            _model(), GraphConfig(strategy=strategy, capture_sizes=sizes, progress=False)
        )
        report = runner.capture([_ids(3)])
        assert report is not None
        del runner
        return report.graph_memory_bytes

    largest_only = graph_memory([2048])
    every_size = graph_memory(list(GraphConfig(max_tokens=2048).sizes))
    assert largest_only > 0
    # NOTE: 42 sizes into one pool; without sharing this would be ~2x the sum of all sizes' needs.
    assert every_size <= 1.5 * largest_only + (32 << 20), (every_size, largest_only)


@pytest.mark.parametrize("strategy", ["breakable", "compile"])
@torch.no_grad()
def test_padded_rows_of_split_outputs_are_zeroed(strategy: str) -> None:
    model = SumsAllRows().cuda()
    runner = PiecewiseGraphRunner(
        model, GraphConfig(strategy=strategy, capture_sizes=[8, 16], progress=False)
    )
    runner.capture([torch.randn(3, 8, device="cuda")])
    for n in (3, 8, 11, 3, 16):
        x = torch.randn(n, 8, device="cuda")
        torch.testing.assert_close(runner(x), model(x))
    assert runner.stats.sizes("piecewise") == {8: 3, 16: 2}


class _Hangs(torch.nn.Module):
    """Blocks for ever the first time it runs under stream capture, as a lazily spawned device
    query did inside a capture on ROCm."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _model()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            threading.Event().wait()
        return self.inner(ids)


@torch.no_grad()
def test_watchdog_turns_a_hung_capture_into_an_error() -> None:
    runner = PiecewiseGraphRunner(
        _Hangs(), GraphConfig(capture_sizes=[32], capture_timeout_s=2.0, progress=False)
    )
    with pytest.raises(CaptureError, match=r"segment 0 at 32 tokens.*within 2s.*GraphConfig"):
        runner.capture([_ids(4)])
    # the device is still usable afterwards
    assert torch.ones(4, device="cuda").sum().item() == 4
